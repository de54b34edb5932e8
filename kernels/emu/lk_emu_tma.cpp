// lk_emu_tma.cpp: TMA in the emulator: cp.async.bulk.tensor between global memory, described by a tensor
// map (LkEmuTensorMap, encoded by lora_kernels::tma), and shared memory.
//
// A box of box[0] × ... elements (innermost first) at signed coordinates c[] is packed densely in shared
// memory, row after row (a row is box[0] elements, a multiple of 16 bytes), and each 16-byte chunk is
// placed at its address with the map's swizzle applied to the ABSOLUTE shared-memory address bits:
//   128-byte: bits [4,7) ^= bits [7,10);  64-byte: bits [4,6) ^= bits [7,9);  32-byte: bit 4 ^= bit 7
// (cute's Swizzle<3,4,3>, <2,4,3>, <1,4,3>). The emulator's dynamic shared memory starts 128 bytes past a
// multiple of 1024 times a seeded 1..7 (lk_emu_check.cpp), so a kernel that assumes more alignment than
// the 128 bytes its declaration promises gets another pattern, as it would on a GPU.
//
// Loads: out-of-bounds elements are zero, the mbarrier still receives the whole box's bytes; the copy is a
// bulk copy (lk_emu_mbarrier.cpp: in flight until it lands, landing only when no thread can run).
// Swizzled boxes must have rows of exactly the swizzle span (the layout of narrower rows is undocumented).
// Stores: the chunks are read (race-checked as reads by the issuing thread) at issue and may not be
// written until the thread's cp.async.bulk.wait_group(.read) retires the store's group, which is when the
// in-bounds elements are written to global memory (memcheck); out-of-bounds elements are dropped (the box
// may not start at a negative coordinate). A thread
// that exits with stores not retired is an error.

#include <cstring>

#include "lk_emu_internal.h"

namespace lk_emu {

namespace {

const LkEmuTensorMap& decode(const void* map, int ncoords, const char* op) {
    if (reinterpret_cast<uintptr_t>(map) % 64 != 0) fail("%s: the tensor map at %p is not 64-byte aligned", op, map);
    const auto& m = *static_cast<const LkEmuTensorMap*>(map);
    if (m.magic != LK_EMU_TENSOR_MAP_MAGIC)
        fail("%s: %p holds no tensor map encoded for the emulator (lora_kernels::tma)", op, map);
    if (int(m.rank) != ncoords)
        fail("%s: %d coordinates for a tensor map of rank %u", op, ncoords, m.rank);
    if (m.swizzle != 0 && m.box[0] * m.elem_bytes != (16u << m.swizzle))
        fail("%s: a box row of %u bytes under the %u-byte swizzle: TMA's layout for rows narrower than the "
             "swizzle span is not documented, so the emulator does not model it (make the row the span)",
             op, m.box[0] * m.elem_bytes, 16u << m.swizzle);
    return m;
}

uintptr_t swizzle(uintptr_t a, uint32_t mode) {
    const unsigned bits = mode;  // 1, 2, 3 for 32, 64, 128 bytes
    if (bits == 0) return a;
    return a ^ (((a >> 7) & ((1u << bits) - 1)) << 4);
}

size_t box_bytes(const LkEmuTensorMap& m) {
    size_t n = m.elem_bytes;
    for (uint32_t d = 0; d < m.rank; ++d) n *= m.box[d];
    return n;
}

// The global address of box element `e` (dense index, innermost first) at coordinates c, or 0 when it is
// out of bounds.
uintptr_t element_address(const LkEmuTensorMap& m, const int32_t* c, size_t e) {
    uintptr_t a = uintptr_t(m.global_address);
    for (uint32_t d = 0; d < m.rank; ++d) {
        const int64_t g = int64_t(c[d]) + int64_t(e % m.box[d]);
        e /= m.box[d];
        if (g < 0 || uint64_t(g) >= m.dims[d]) return 0;
        a += uintptr_t(g) * uintptr_t(d == 0 ? m.elem_bytes : m.strides[d]);
    }
    return a;
}

void check_smem_box(const void* smem, size_t bytes, const char* op) {
    if (reinterpret_cast<uintptr_t>(smem) % 128 != 0 || !in_smem_window(smem, bytes))
        fail("%s: shared-memory address %p (%zu bytes) is not 128-byte aligned inside the block's shared memory", op,
             smem, bytes);
}

void perform_store(const BulkStore& s, unsigned tid) {
    const LkEmuTensorMap& m = s.map;
    const size_t total = box_bytes(m), per_chunk = 16 / m.elem_bytes;
    for (size_t q = 0; q < total / 16; ++q) {
        const unsigned char* chunk =
            reinterpret_cast<const unsigned char*>(swizzle(reinterpret_cast<uintptr_t>(s.src) + 16 * q, m.swizzle));
        for (size_t i = 0; i < per_chunk; ++i) {
            const uintptr_t g = element_address(m, s.coords, q * per_chunk + i);
            if (!g) continue;
            global_access(reinterpret_cast<void*>(g), m.elem_bytes, true, "cp.async.bulk.tensor store");
            std::memcpy(reinterpret_cast<void*>(g), chunk + i * m.elem_bytes, m.elem_bytes);
        }
        // the store reads its source until now: a read by the issuing thread at its wait
        smem_access(chunk, 16, false, tid);
        async_read_end(size_t(chunk - g_launch->smem), 16);
    }
}

}  // namespace

void tma_load(void* smem_dst, const void* map, const int32_t* coords, int ncoords, void* bar) {
    const char* op = "cp.async.bulk.tensor (global to shared)";
    Launch& L = *g_launch;
    const LkEmuTensorMap& m = decode(map, ncoords, op);
    const size_t total = box_bytes(m), per_chunk = 16 / m.elem_bytes;
    check_smem_box(smem_dst, total, op);
    BulkCopy c;
    c.bytes.assign(total, 0);
    for (size_t q = 0; q < total / 16; ++q) {
        const uintptr_t at = swizzle(reinterpret_cast<uintptr_t>(smem_dst) + 16 * q, m.swizzle);
        c.chunks.push_back(size_t(reinterpret_cast<unsigned char*>(at) - L.smem));
        for (size_t i = 0; i < per_chunk; ++i) {
            const uintptr_t g = element_address(m, coords, q * per_chunk + i);
            if (!g) continue;  // out of bounds: zero
            global_access(reinterpret_cast<const void*>(g), m.elem_bytes, false, "cp.async.bulk.tensor source");
            std::memcpy(c.bytes.data() + 16 * q + i * m.elem_bytes, reinterpret_cast<const void*>(g), m.elem_bytes);
        }
    }
    issue_bulk_copy(std::move(c), bar, op);
}

void tma_store(const void* map, const int32_t* coords, int ncoords, const void* smem_src) {
    const char* op = "cp.async.bulk.tensor (shared to global)";
    Launch& L = *g_launch;
    const LkEmuTensorMap& m = decode(map, ncoords, op);
    const size_t total = box_bytes(m);
    check_smem_box(smem_src, total, op);
    for (int d = 0; d < ncoords; ++d)
        if (coords[d] < 0)
            fail("%s: coordinate %d is %d; a store's box may reach past the end of the tensor but not before its "
                 "start",
                 op, d, coords[d]);
    // the store writes global memory when retired, perhaps after a wait it was issued before
    check_dependency_waited(reinterpret_cast<const void*>(m.global_address), total, true, "cp.async.bulk.tensor store");
    BulkStore s;
    s.map = m;
    std::memcpy(s.coords, coords, sizeof(int32_t) * size_t(ncoords));
    s.src = static_cast<unsigned char*>(const_cast<void*>(smem_src));
    for (size_t q = 0; q < total / 16; ++q) {
        const uintptr_t at = swizzle(reinterpret_cast<uintptr_t>(smem_src) + 16 * q, m.swizzle);
        smem_access(reinterpret_cast<const void*>(at), 16, false, g_fiber->linear);
        check_proxy_fenced(size_t(reinterpret_cast<unsigned char*>(at) - L.smem), 16, "a bulk tensor store");
        async_read_begin(size_t(reinterpret_cast<unsigned char*>(at) - L.smem), 16);
    }
    g_fiber->stores_uncommitted.push_back(s);
}

void bulk_commit_group() {
    g_fiber->store_groups.push_back(std::move(g_fiber->stores_uncommitted));
    g_fiber->stores_uncommitted.clear();
}

void bulk_wait_group(int n) { retire_bulk_stores(*g_fiber, size_t(n < 0 ? 0 : n)); }

void retire_bulk_stores(Fiber& f, size_t keep) {
    while (f.store_groups.size() > keep) {
        for (const BulkStore& s : f.store_groups.front()) perform_store(s, f.linear);
        f.store_groups.pop_front();
    }
}

bool stores_pending(const Fiber& f) { return !f.store_groups.empty() || !f.stores_uncommitted.empty(); }

}  // namespace lk_emu
