/* fuzz_path.c: libFuzzer driver for path normalisation; see mp_fuzz_path()
 * in path.c. */
#include "path.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    mp_fuzz_path(data, size);
    return 0;
}
