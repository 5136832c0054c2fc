/* err.c: the one definition of each failure reason of err.h; its text is
 * the one logged (specs match these lines). */
#include "err.h"

const char mp_err_connect[] = "connect failed";
const char mp_err_connect_timeout[] = "connect timed out";
const char mp_err_tls[] = "TLS handshake failed";
const char mp_err_send_timeout[] = "send timed out";
const char mp_err_read_timeout[] = "read timed out";
const char mp_err_reset[] = "connection broken";
const char mp_err_invalid[] = "invalid response";
const char mp_err_hook[] = "response hook failed";
