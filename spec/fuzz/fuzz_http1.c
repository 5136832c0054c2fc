/* fuzz_http1.c: libFuzzer driver for the request and response head parsers
 * (whole, split in two, byte by byte); see mp_fuzz_http1() in http1.c. */
#include "http1.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    mp_fuzz_http1(data, size);
    return 0;
}
