/* One entry point per qbak command: int cmd_NAME(int argc, char **argv),
 * argv[0] being the command's name.  Each parses its own options (cli.h)
 * and returns the exit status.  main.c lists them in its command table. */
#ifndef QBAK_AGENT_CMD_CMD_H
#define QBAK_AGENT_CMD_CMD_H

int cmd_backup(int argc, char **argv);
int cmd_config(int argc, char **argv);
int cmd_list(int argc, char **argv);
int cmd_protect(int argc, char **argv);
int cmd_prune(int argc, char **argv);
int cmd_restore(int argc, char **argv);
int cmd_verify(int argc, char **argv);
int cmd_unprotect(int argc, char **argv);
int cmd_run(int argc, char **argv);
int cmd_status(int argc, char **argv);
int cmd_ls(int argc, char **argv);
int cmd_find(int argc, char **argv);
int cmd_get(int argc, char **argv);
int cmd_mount(int argc, char **argv);
int cmd_umount(int argc, char **argv);
int cmd_index(int argc, char **argv);

#endif
