/* lora_params.h: the parameter struct of every kernel in kernels/ (one .cu file per op family).
 *
 * Every kernel takes exactly ONE of these structs by value. This header is the single source of
 * truth for the argument lists: build.rs runs bindgen over it (src/params_bindings.rs is the
 * committed output, kept fresh by a test), so Rust and CUDA cannot drift apart.
 *
 * Rules: plain C, fixed-width integers, pointers as `void*` (a kernel is instantiated per dtype and
 * casts; the Rust side checks the dtype before filling the struct), sizes in elements, leading
 * dimensions in elements, row-major everywhere.
 */
#ifndef LORA_PARAMS_H
#define LORA_PARAMS_H

#include <stdint.h>

/* y[i] = scale * x[i] for i < n (kernels/scale.cu). The trivial kernel that carries the whole path
 * (build.rs -> embedded module -> launch plan -> safe op -> reference test) for both backends. */
typedef struct LkScaleParams {
    const void* x;
    void* y;
    float scale;
    uint32_t n;
} LkScaleParams;

#endif /* LORA_PARAMS_H */
