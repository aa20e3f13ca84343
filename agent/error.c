/* qbak's error domain: see error.h. */
#include "agent/error.h"

G_DEFINE_QUARK(qbak - error - quark, qbak_error)
