// lk_emu_async.cpp: cp.async in the emulator.
//
// A copy reads its global source when issued (memcheck checks that read) and lands in shared memory only
// at the cp.async.wait_group that retires its group. Between the two the destination is "in flight": it
// is filled with 0xFF (NaN in f32/bf16/f16) at issue, and the race detector reports any access to it by
// any thread, the issuer included; the landing counts as a write by the issuing thread at the wait, so
// other threads need a barrier after that wait before they read it.

#include <cstring>

#include "lk_emu_internal.h"

namespace lk_emu {

void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes) {
    if (src_bytes < 0 || src_bytes > 16) fail("cp.async: src-size %d is outside 0..16", src_bytes);
    if (!in_smem_window(smem_dst, 16) || reinterpret_cast<uintptr_t>(smem_dst) % 16 != 0)
        fail("cp.async: destination %p is not 16-byte aligned inside the block's shared memory", smem_dst);
    if (src_bytes > 0 && reinterpret_cast<uintptr_t>(gmem_src) % 16 != 0)
        fail("cp.async: source %p is not 16-byte aligned", gmem_src);
    AsyncCopy c;
    c.dst = static_cast<unsigned char*>(smem_dst);
    std::memset(c.bytes, 0, 16);
    if (src_bytes > 0) {
        global_access(gmem_src, size_t(src_bytes), false, "cp.async source");
        std::memcpy(c.bytes, gmem_src, size_t(src_bytes));
    }
    smem_async_issue(c.dst, g_fiber->linear);
    g_fiber->uncommitted.push_back(c);
}

void cp_async_commit() {
    g_fiber->groups.push_back(std::move(g_fiber->uncommitted));
    g_fiber->uncommitted.clear();
}

void cp_async_wait(int n) {
    auto& groups = g_fiber->groups;
    while (groups.size() > size_t(n < 0 ? 0 : n)) {
        for (const AsyncCopy& c : groups.front()) {
            std::memcpy(c.dst, c.bytes, 16);
            smem_async_land(c.dst, g_fiber->linear);
        }
        groups.pop_front();
    }
}

}  // namespace lk_emu
