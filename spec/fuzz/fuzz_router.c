/* fuzz_router.c: libFuzzer driver for route matching (host, path, method
 * and headers from the input); see mp_fuzz_router() in router.c. */
#include "router.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    mp_fuzz_router(data, size);
    return 0;
}
