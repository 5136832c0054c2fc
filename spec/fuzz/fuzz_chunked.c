/* fuzz_chunked.c: libFuzzer driver for the chunked decoder (whole against
 * random pieces); see mp_fuzz_chunked() in http1.c. */
#include "http1.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    mp_fuzz_chunked(data, size);
    return 0;
}
