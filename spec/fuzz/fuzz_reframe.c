/* fuzz_reframe.c: libFuzzer driver for the differential re-framing target:
 * a chunked body decoded in place and re-framed as the relay does must parse
 * strictly to the same data and trailer fields; see mp_fuzz_reframe() in
 * fuzz.c. */
#include "http1.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    mp_fuzz_reframe(data, size);
    return 0;
}
