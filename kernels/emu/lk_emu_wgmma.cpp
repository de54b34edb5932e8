// lk_emu_wgmma.cpp: wgmma.mma_async (m64nNk16, bf16/f16 operands, f32 accumulators) in the emulator, with
// wgmma.fence, commit_group and wait_group (lk_wgmma.cuh has the layouts).
//
// - Issue is a rendezvous of the warpgroup's 128 threads (warps 4g..4g+3; a block whose warpgroup is not
//   whole is an error). Every thread must bring the same descriptors, N, type and flags.
// - The operands' shared-memory addresses are decoded from the descriptors at issue (bounds checked); the
//   bytes are reads of the warpgroup's wgmma agent (happens-before mode): checked against earlier writes
//   with the first thread's knowledge, and ordered before another thread's later write only through a
//   wait_group that retired the op (then a release, e.g. an mbarrier arrive) - releasing a stage before
//   waiting for the wgmma that reads it is a race, whatever the interleaving. The bytes may not be
//   written until all 128 threads have waited for the op. Their values are read when the op is computed,
//   at the first wait that retires it.
// - The accumulators are copied at issue and then filled with NaN in every thread; a wait_group that
//   retires the op writes the result back into that thread's registers (unless a later op on the same
//   registers is still pending), so a kernel that reads them early reads NaN. Ops on the same accumulators
//   chain (the later one's C is the earlier one's result), as on the GPU.
// - A thread must execute wgmma.fence after its last wait_group before it issues again, and may not exit
//   with ops not waited for.
// - The arithmetic is the launch's mma model (exact, or the tensor-core model of lk_emu_warp.cpp): per
//   element the 16 products and C, as for mma.sync. Hardware bits are not claimed.
// - A descriptor with a non-zero base offset is refused (its meaning is not documented beyond the
//   alignment rule).

#include <cmath>
#include <cstring>

#include "lk_emu_internal.h"

namespace lk_emu {

namespace {

}  // namespace

}  // namespace lk_emu

// The shared-memory address of operand element (row r, column k < 16) of a 2-byte type (lk_wgmma.cuh's
// formulas), or UINT64_MAX for a descriptor with a non-zero base offset. Exported for the layout tests.
extern "C" uint64_t lk_emu_wgmma_operand_address(uint64_t desc, uint32_t mn_major, uint32_t r, uint32_t k) {
    const uint64_t start = (desc & 0x3FFF) << 4, lbo = ((desc >> 16) & 0x3FFF) << 4, sbo = ((desc >> 32) & 0x3FFF) << 4;
    if (((desc >> 49) & 7) != 0) return UINT64_MAX;
    const unsigned mode = unsigned(desc >> 62);
    const uint64_t w = mode == 1 ? 128 : mode == 2 ? 64 : mode == 3 ? 32 : 0;  // swizzle bytes
    uint64_t a;
    if (!mn_major)
        a = w == 0 ? start + 16 * (r % 8) + sbo * (r / 8) + 2 * (k % 8) + lbo * (k / 8)
                   : start + w * (r % 8) + sbo * (r / 8) + 2 * k;
    else
        a = w == 0 ? start + 2 * (r % 8) + sbo * (r / 8) + 16 * (k % 8) + lbo * (k / 8)
                   : start + 2 * (r % (w / 2)) + lbo * (r / (w / 2)) + w * (k % 8) + sbo * (k / 8);
    if (w) a ^= ((a >> 7) & (w / 16 - 1)) << 4;
    return a;
}

namespace lk_emu {

namespace {

// The shared-memory window offset of operand element (row r, column k < 16) of a 2-byte type.
size_t operand_offset(uint64_t desc, bool mn_major, uint32_t r, uint32_t k, const char* which) {
    const Launch& L = *g_launch;
    const uint64_t addr = lk_emu_wgmma_operand_address(desc, mn_major, r, k);
    if (addr == UINT64_MAX)
        fail("wgmma.mma_async: the %s descriptor's base offset is %u; only 0 is emulated (align the swizzled "
             "tile to its pattern: 1024/512/256 bytes for 128/64/32-byte swizzle)",
             which, unsigned((desc >> 49) & 7));
    const size_t a = size_t(addr);
    if (a < L.smem_misalign || a + 2 > L.smem_misalign + L.window_bytes)
        fail("wgmma.mma_async: the %s operand's element (%u, %u) is at shared-memory address %zu, outside the "
             "block's shared memory",
             which, r, k, a);
    return a - L.smem_misalign;
}

// Frees an op's result once every thread has copied it (all 128 waited) and the op chained after it, if
// any, has read it as C. No later op can chain to it then: chaining needs it pending in thread 0.
void release_out(WgState& W, int idx) {
    WgOp& op = W.ops[size_t(idx)];
    if (op.retired == 128 && (op.next < 0 || W.ops[size_t(op.next)].computed)) std::vector<float>().swap(op.out);
}

double element(const WgOp& op, bool is_a, uint32_t r, uint32_t k) {
    const Launch& L = *g_launch;
    if (is_a && op.a_regs) {  // mma.m16n8k16's A fragment, warp w holding rows 16w..16w+15
        const uint32_t w = r / 16, g = r % 8, hi_row = (r % 16) / 8, q = (k % 8) / 2, hi_k = k / 8;
        const uint32_t t = 32 * w + 4 * g + q, reg = hi_row + 2 * hi_k;
        return b16_to_double(uint16_t(op.a_frag[4 * t + reg] >> (16 * (k % 2))), op.f16);
    }
    const size_t off = operand_offset(is_a ? op.desc_a : op.desc_b, (is_a ? op.trans_a : op.trans_b) != 0, r, k,
                                      is_a ? "A" : "B");
    uint16_t v;
    std::memcpy(&v, L.smem + off, 2);
    return b16_to_double(v, op.f16);
}

void compute(Launch& L, WgState& W, int idx) {
    WgOp& op = W.ops[size_t(idx)];
    if (op.computed) return;
    if (op.prev >= 0) compute(L, W, op.prev);
    const unsigned n = op.n, per = n / 2;
    std::vector<double> a(64 * 16), b(16 * size_t(n));
    for (uint32_t m = 0; m < 64; ++m)
        for (uint32_t k = 0; k < 16; ++k) a[m * 16 + k] = element(op, true, m, k);
    for (uint32_t j = 0; j < n; ++j)
        for (uint32_t k = 0; k < 16; ++k) b[k * n + j] = element(op, false, j, k);
    const std::vector<float>& c = op.prev >= 0 ? W.ops[size_t(op.prev)].out : op.c_in;
    std::vector<float> out(128 * size_t(per), 0.0f);
    for (unsigned t = 0; t < 128; ++t)
        for (unsigned i = 0; i < per; ++i) {
            const uint32_t row = 16 * (t / 32) + (t % 32) / 4 + 8 * ((i / 2) % 2);
            const uint32_t col = 8 * (i / 4) + 2 * (t % 4) + i % 2;
            const double cv = op.accumulate ? double(c[t * per + i]) : 0.0;
            double prod[16], acc = 0.0;
            for (int k = 0; k < 16; ++k) prod[k] = a[row * 16 + size_t(k)] * b[size_t(k) * n + col];
            float d;
            if (L.mma_model == LK_EMU_MMA_TENSOR_CORE) {
                d = tensor_core_sum(prod, cv);
            } else {  // exact products summed in double, k ascending, one rounding (as mma.sync here)
                for (int k = 0; k < 16; ++k) acc += prod[k];
                d = float(acc + cv);
            }
            out[t * per + i] = d;
        }
    op.out = std::move(out);
    op.computed = true;
    // what only this computation needed
    std::vector<float>().swap(op.c_in);
    std::vector<uint32_t>().swap(op.a_frag);
    if (op.prev >= 0) release_out(W, op.prev);
}

// Whether thread t still has an op pending on the accumulators at `d`.
bool pending_on(const Fiber& f, const WgState& W, const float* d) {
    for (int i : f.wg_uncommitted)
        if (W.ops[size_t(i)].d[f.linear % 128] == d) return true;
    for (const auto& g : f.wg_groups)
        for (int i : g)
            if (W.ops[size_t(i)].d[f.linear % 128] == d) return true;
    return false;
}

// The last of the 128 arrivals: builds the op, checks its operands, poisons the accumulators.
void issue(Launch& L, WgState& W, unsigned group) {
    const WgArrival& first = W.lanes[0];
    for (unsigned t = 1; t < 128; ++t) {
        const WgArrival& x = W.lanes[t];
        if (std::memcmp(x.key, first.key, sizeof first.key) != 0 || x.desc_a != first.desc_a ||
            x.desc_b != first.desc_b)
            fail("wgmma.mma_async: thread %u of warpgroup %u issues a different wgmma (descriptors, N, type or "
                 "flags) from its thread 0; all 128 threads must issue the same one",
                 t, group);
    }
    WgOp op;
    op.n = first.key[0];
    op.f16 = first.key[1] != 0;
    op.a_regs = first.key[2] != 0;
    op.accumulate = first.key[3] != 0;
    op.trans_a = first.key[4];
    op.trans_b = first.key[5];
    op.desc_a = first.desc_a;
    op.desc_b = first.desc_b;
    const unsigned per = op.n / 2;
    if (op.a_regs) op.a_frag.resize(128 * 4);
    op.c_in.resize(128 * size_t(per));
    const int idx = int(W.ops.size());
    // the earlier op still pending on these accumulators (thread 0's view; the others' must agree): the
    // latest op on them, if any op on them is pending (groups retire oldest first, so then that one is)
    const Fiber& f0 = L.fibers[group * 128];
    auto last = W.last_on.begin();
    while (last != W.last_on.end() && last->first != W.lanes[0].d) ++last;
    if (last != W.last_on.end() && pending_on(f0, W, W.lanes[0].d)) op.prev = last->second;
    if (last == W.last_on.end()) last = W.last_on.insert(last, {W.lanes[0].d, idx});
    last->second = idx;
    if (op.prev >= 0) W.ops[size_t(op.prev)].next = idx;
    if (op.prev >= 0 && W.ops[size_t(op.prev)].n != op.n)
        fail("wgmma.mma_async: N = %u on accumulators a pending wgmma with N = %u still writes", op.n,
             W.ops[size_t(op.prev)].n);
    for (unsigned t = 0; t < 128; ++t) {
        op.d[t] = W.lanes[t].d;
        if (op.a_regs) std::memcpy(&op.a_frag[4 * t], W.lanes[t].a, 16);
        std::memcpy(&op.c_in[t * per], op.d[t], per * sizeof(float));
    }
    // the shared-memory chunks it reads: race-checked now, protected from writes until every thread waited
    std::vector<char> seen(L.window_bytes / 16 + 1, 0);
    auto note = [&](size_t off) {
        if (!seen[off / 16]) seen[off / 16] = 1, op.chunks.push_back(off / 16 * 16);
    };
    for (uint32_t k = 0; k < 16; ++k) {
        if (!op.a_regs)
            for (uint32_t m = 0; m < 64; ++m) note(operand_offset(op.desc_a, op.trans_a != 0, m, k, "A"));
        for (uint32_t j = 0; j < op.n; ++j) note(operand_offset(op.desc_b, op.trans_b != 0, j, k, "B"));
    }
    // The reads happen at some time up to the op's completion: they are the warpgroup's wgmma agent's, at
    // a clock that only a wait_group retiring the op acquires (an arrive before that wait releases nothing
    // of them), checked against earlier writes with the knowledge of the warpgroup's first thread.
    hb_enable(L);
    const unsigned agent = L.nthreads + group;
    op.clock = ++L.agent_clock[group];
    for (size_t off : op.chunks) {
        smem_agent_read(off, 16, group * 128, agent, op.clock);
        check_proxy_fenced(off, 16, "a wgmma.mma_async");
        async_read_begin(off, 16);
    }
    for (unsigned t = 0; t < 128; ++t) {
        for (unsigned i = 0; i < per; ++i) op.d[t][i] = std::nanf("");  // read before the wait: NaN
        L.fibers[group * 128 + t].wg_uncommitted.push_back(idx);
    }
    W.ops.push_back(std::move(op));
}

}  // namespace

uint32_t smem_address(const void* p) {
    const Launch& L = *g_launch;
    if (!in_smem_window(p, 1)) fail("%p is not in the block's shared memory", p);
    const size_t a = size_t(static_cast<const unsigned char*>(p) - smem_zero(L));
    if (a >= (size_t(1) << 18))
        fail("shared-memory address %zu of %p does not fit a wgmma descriptor's 18 bits (the emulator places "
             "static shared memory after up to 227 KB of dynamic: keep wgmma operands in dynamic shared memory)",
             a, p);
    return uint32_t(a);
}

void wgmma_begin_block(Launch& L) {
    L.warpgroups.assign((L.nthreads + 127) / 128, WgState{});
    for (Fiber& f : L.fibers) {
        f.wg_fenced = false;
        f.wg_uncommitted.clear();
        f.wg_groups.clear();
    }
}

void wgmma_fence() { g_fiber->wg_fenced = true; }

void wgmma_commit() {
    g_fiber->wg_groups.push_back(std::move(g_fiber->wg_uncommitted));
    g_fiber->wg_uncommitted.clear();
}

void wgmma_wait(int n) {
    Launch& L = *g_launch;
    Fiber& f = *g_fiber;
    WgState& W = L.warpgroups[f.linear / 128];
    const unsigned t = f.linear % 128;
    while (f.wg_groups.size() > size_t(n < 0 ? 0 : n)) {
        const std::vector<int> group = std::move(f.wg_groups.front());
        f.wg_groups.pop_front();
        for (int i : group) {
            compute(L, W, i);
            WgOp& op = W.ops[size_t(i)];
            uint32_t& known = hb_row(L, f.linear)[L.nthreads + f.linear / 128];
            known = std::max(known, op.clock);
            if (!pending_on(f, W, op.d[t])) std::memcpy(op.d[t], &op.out[t * (op.n / 2)], (op.n / 2) * sizeof(float));
            if (++op.retired == 128) {
                for (size_t off : op.chunks) async_read_end(off, 16);
                std::vector<size_t>().swap(op.chunks);
                release_out(W, i);
            }
        }
    }
    f.wg_fenced = false;  // the accumulators may be touched now: fence again before the next issue
}

void wgmma_mma_async(float* d, int n, bool f16, const uint32_t* a_regs, uint64_t desc_a, uint64_t desc_b,
                     bool accumulate, int trans_a, int trans_b) {
    Launch& L = *g_launch;
    Fiber& f = *g_fiber;
    const unsigned group = f.linear / 128;
    if (L.nthreads < 128 * (group + 1))
        fail("wgmma.mma_async: warpgroup %u (threads %u..%u) is not whole in a block of %u threads", group, group * 128,
             group * 128 + 127, L.nthreads);
    if (n < 8 || n > 256 || n % 8 != 0) fail("wgmma.mma_async: N = %d is not a multiple of 8 in 8..256", n);
    if (!f.wg_fenced)
        fail("wgmma.mma_async without a wgmma.fence since this thread's last wgmma.wait_group (or the block start): "
             "the accumulator registers are not ordered");
    WgState& W = L.warpgroups[group];
    WgArrival& me = W.lanes[f.linear % 128];
    me.d = d;
    me.desc_a = desc_a;
    me.desc_b = desc_b;
    if (a_regs) std::memcpy(me.a, a_regs, sizeof me.a);
    const uint32_t key[6] = {uint32_t(n), f16, a_regs != nullptr, accumulate, uint32_t(trans_a), uint32_t(trans_b)};
    std::memcpy(me.key, key, sizeof key);
    if (++W.arrived < 128) {
        f.state = IN_WARP_OP;
        yield();
        return;
    }
    W.arrived = 0;
    issue(L, W, group);
    for (unsigned t = 0; t < 128; ++t) {
        Fiber& o = L.fibers[group * 128 + t];
        if (&o != &f) o.state = READY;
    }
}

bool wgmma_thread_exit(Fiber& f) { return f.wg_uncommitted.empty() && f.wg_groups.empty(); }

}  // namespace lk_emu
