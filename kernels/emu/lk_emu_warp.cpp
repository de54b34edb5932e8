// lk_emu_warp.cpp: warp collectives (__shfl_*_sync, __syncwarp, ldmatrix, mma.sync) in the emulator.
//
// Every lane deposits its operands and blocks; when the last lane named by the mask arrives (lanes of the
// mask that have exited do not count: only the non-exited named lanes must participate), that lane
// computes for the whole group with the PTX ISA's semantics and fragment layouts and releases the others.
// Collectives with disjoint masks may be in progress in one warp at once; overlapping masks that differ,
// or different ops under one mask, are an error. __syncwarp orders the shared-memory accesses of its lanes
// for the race detector; the other collectives move registers only and order nothing.

#include <cmath>
#include <cstdio>
#include <cstring>

#include "lk_emu_internal.h"

namespace lk_emu {

const char* op_name(int op) {
    switch (op) {
        case OP_SHFL: return "__shfl_*_sync";
        case OP_SYNCWARP: return "__syncwarp";
        case OP_LDMATRIX: return "ldmatrix";
        case OP_MMA: return "mma.sync";
        default: return "none";
    }
}

namespace {

uint16_t load_b16(const unsigned char* p) {
    uint16_t v;
    std::memcpy(&v, p, 2);
    return v;
}

}  // namespace

double b16_to_double(uint16_t v, bool f16) {
    if (f16) return double(__half2float(__half{v}));
    return double(__bfloat162float(__nv_bfloat16{v}));
}

namespace {

unsigned exited_lanes(const Launch& L, unsigned warp) {
    unsigned m = 0;
    for (unsigned l = 0; l < 32 && warp * 32 + l < L.nthreads; ++l)
        if (L.fibers[warp * 32 + l].state == DONE) m |= 1u << l;
    return m;
}

// The CUDA guide's source lane for each shuffle; -1 when the lane keeps its own value.
int shfl_source(int kind, int lane, int arg, int width) {
    const int seg = lane & ~(width - 1);
    switch (kind) {
        case SHFL_IDX: return seg + (arg & (width - 1));
        case SHFL_UP: return (lane - seg) >= arg ? lane - arg : -1;
        case SHFL_DOWN: return (lane - seg) + arg < width ? lane + arg : -1;
        case SHFL_XOR: {
            // "each group of width consecutive threads are able to access elements from earlier groups
            // of threads, however if they attempt to access elements from later groups of threads their
            // own value of var will be returned" (CUDA C++ Programming Guide, warp shuffle functions)
            const int src = (lane ^ arg) & 31;
            return src >= seg + width ? -1 : src;
        }
    }
    return -1;
}

void compute_shfl(Pending& w) {
    uint32_t vals[32];
    for (int l = 0; l < 32; ++l) vals[l] = w.lanes[l] ? w.lanes[l]->in[0] : 0;
    for (int l = 0; l < 32; ++l) {
        LaneOp* op = w.lanes[l];
        if (!op) continue;
        const int src = shfl_source(op->variant, l, op->arg, op->width);
        if (src < 0) {
            op->out[0] = vals[l];
            continue;
        }
        if (!(w.mask & (1u << src)))
            fail("__shfl_*_sync: lane %d reads lane %d, which is not in the mask 0x%08x", l, src, w.mask);
        if (!w.lanes[src])
            fail("__shfl_*_sync: lane %d reads lane %d, which has exited (its value is undefined)", l, src);
        op->out[0] = vals[src];
    }
}

void compute_ldmatrix(Pending& w, unsigned warp_base) {
    const int n = w.variant >> 1;
    const bool trans = w.variant & 1;
    for (int l = 0; l < 8 * n; ++l) {
        const void* a = w.lanes[l]->addr;
        if (!in_smem_window(a, 16) || reinterpret_cast<uintptr_t>(a) % 16 != 0)
            fail("ldmatrix: lane %d row address %p is not a 16-byte aligned row inside the block's shared memory", l,
                 a);
        smem_access(a, 16, false, warp_base + l);  // the row is read by the lane that supplied its address
    }
    for (int l = 0; l < 32; ++l) {
        for (int j = 0; j < n; ++j) {
            auto row = [&](int r) { return static_cast<const unsigned char*>(w.lanes[8 * j + r]->addr); };
            uint16_t lo, hi;
            if (!trans) {
                lo = load_b16(row(l / 4) + 2 * (2 * (l % 4)));
                hi = load_b16(row(l / 4) + 2 * (2 * (l % 4) + 1));
            } else {
                lo = load_b16(row(2 * (l % 4)) + 2 * (l / 4));
                hi = load_b16(row(2 * (l % 4) + 1) + 2 * (l / 4));
            }
            w.lanes[l]->out[j] = uint32_t(lo) | (uint32_t(hi) << 16);
        }
    }
}

}  // namespace

// Rounds toward zero to a multiple of 2^e (a truncating alignment shifter).
double truncate_to(double x, int e) { return std::ldexp(std::trunc(std::ldexp(x, -e)), e); }

// The tensor-core model (LK_EMU_MMA_TENSOR_CORE): per output element, the 16 exact products and c are
// aligned to the largest exponent among them, each truncated to 24 + 2 bits below it (2 extra alignment
// bits), summed exactly, and the sum truncated to f32 (round toward zero). After the published models of
// A100/H100 tensor cores (Fasi et al. 2021, PeerJ CS 7:e330): not bit-exact to any GPU, but its error is of
// the same kind and size, so tests can check their tolerances against it without a GPU.
float tensor_core_sum(const double* products, double c) {
    int emax = INT32_MIN;
    auto consider = [&](double v) {
        if (v != 0.0) emax = std::max(emax, std::ilogb(v));
    };
    for (int k = 0; k < 16; ++k) consider(products[k]);
    consider(c);
    if (emax == INT32_MIN) return float(c + 0.0);
    const int e = emax - 25;
    double sum = truncate_to(c, e);
    for (int k = 0; k < 16; ++k) sum += truncate_to(products[k], e);
    if (sum == 0.0 || !std::isfinite(sum)) return float(sum);
    const int se = std::ilogb(sum);
    return float(truncate_to(sum, se - 23));
}

namespace {

void compute_mma(Pending& w) {
    const bool f16 = w.variant;
    double a[16][16], b[16][8], c[16][8], acc[16][8] = {};
    for (int l = 0; l < 32; ++l) {
        const uint32_t* in = w.lanes[l]->in;  // a0..a3, b0..b1, c0..c3 (c as float bits)
        const int g = l / 4, t = l % 4;
        for (int e = 0; e < 8; ++e) {
            const int reg = e / 2, half = e % 2;
            const int row = g + 8 * (reg & 1), col = t * 2 + half + 8 * (reg >= 2);
            a[row][col] = b16_to_double(uint16_t(in[reg] >> (16 * half)), f16);
        }
        for (int e = 0; e < 4; ++e) {
            const int reg = e / 2, half = e % 2;
            b[t * 2 + half + 8 * reg][g] = b16_to_double(uint16_t(in[4 + reg] >> (16 * half)), f16);
        }
        for (int i = 0; i < 4; ++i) c[g + 8 * (i >= 2)][t * 2 + (i & 1)] = __uint_as_float(in[6 + i]);
    }
    if (g_launch->mma_model == LK_EMU_MMA_TENSOR_CORE) {
        for (int row = 0; row < 16; ++row)
            for (int col = 0; col < 8; ++col) {
                double prod[16];
                for (int k = 0; k < 16; ++k) prod[k] = a[row][k] * b[k][col];
                const float d = tensor_core_sum(prod, c[row][col]);
                w.lanes[row % 8 * 4 + col / 2]->out[(row >= 8) * 2 + (col & 1)] = __float_as_uint(d);
            }
        return;
    }
    // Exact products summed in double (k ascending for every element), one rounding to f32 at the end.
    // k outer with an accumulator array: the same order per element as a k-inner loop, so the same bits.
    for (int k = 0; k < 16; ++k)
        for (int row = 0; row < 16; ++row) {
            const double av = a[row][k];
            for (int col = 0; col < 8; ++col) acc[row][col] += av * b[k][col];
        }
    for (int l = 0; l < 32; ++l) {
        const int g = l / 4, t = l % 4;
        for (int i = 0; i < 4; ++i) {
            const int row = g + 8 * (i >= 2), col = t * 2 + (i & 1);
            w.lanes[l]->out[i] = __float_as_uint(float(acc[row][col] + c[row][col]));
        }
    }
}

// Computes a complete collective and releases its lanes (all but `self`, which is running).
void complete(Launch& L, unsigned warp, size_t idx, int self_lane) {
    Pending p = L.warps[warp].pending[idx];
    L.warps[warp].pending.erase(L.warps[warp].pending.begin() + long(idx));
    const unsigned base = warp * 32;
    switch (p.op) {
        case OP_SHFL: compute_shfl(p); break;
        case OP_LDMATRIX: compute_ldmatrix(p, base); break;
        case OP_MMA: compute_mma(p); break;
        case OP_SYNCWARP: {
            const uint32_t seq = ++L.warps[warp].sync_seq;
            unsigned tids[32], n = 0;
            for (unsigned l = 0; l < 32; ++l)
                if (p.lanes[l]) L.fibers[base + l].warp_sync = seq, tids[n++] = base + l;
            hb_join_lanes(L, tids, n);
            break;
        }
        default: break;
    }
    for (unsigned l = 0; l < 32; ++l)
        if (p.lanes[l] && int(l) != self_lane) L.fibers[base + l].state = READY;
}

// A lane joins a warp collective; returns once the collective has been computed.
void warp_collective(LaneOp& op) {
    Fiber& f = *g_fiber;
    Launch& L = *g_launch;
    const unsigned lane = f.linear % 32, warp = f.linear / 32;
    const unsigned warp_base = f.linear - lane;
    const unsigned present = L.nthreads - warp_base >= 32 ? 0xffffffffu : ((1u << (L.nthreads - warp_base)) - 1);
    if (!(op.mask & (1u << lane)))
        fail("%s: %s (lane %u) executes it with mask 0x%08x that excludes itself", op_name(op.op), where(f).c_str(),
             lane, op.mask);
    if (op.mask & ~present)
        fail("%s: mask 0x%08x names lanes that do not exist in this warp (block has %u threads)", op_name(op.op),
             op.mask, L.nthreads);
    if ((op.op == OP_MMA || op.op == OP_LDMATRIX) && op.mask != 0xffffffffu)
        fail("%s: needs all 32 lanes of the warp (.aligned), %s is in a partial warp", op_name(op.op),
             where(f).c_str());
    auto& pending = L.warps[warp].pending;
    size_t idx = pending.size();
    for (size_t i = 0; i < pending.size(); ++i) {
        const Pending& p = pending[i];
        if (!(p.mask & op.mask)) continue;  // disjoint: another group's collective
        if (p.op != op.op || p.variant != op.variant || p.mask != op.mask)
            fail("mismatched warp collectives in warp %u: %s (lane %u) does %s/%d with mask 0x%08x while other lanes "
                 "do %s/%d with mask 0x%08x",
                 warp, where(f).c_str(), lane, op_name(op.op), op.variant, op.mask, op_name(p.op), p.variant, p.mask);
        idx = i;
    }
    if (idx == pending.size()) {
        Pending p;
        p.op = op.op;
        p.variant = op.variant;
        p.mask = op.mask;
        pending.push_back(p);
    }
    Pending& p = pending[idx];
    p.lanes[lane] = &op;
    p.arrived |= 1u << lane;
    const unsigned exited = exited_lanes(L, warp);
    if ((op.op == OP_MMA || op.op == OP_LDMATRIX) && exited)
        fail("%s: needs all 32 lanes of the warp (.aligned), but lanes 0x%08x have exited", op_name(op.op), exited);
    if (p.arrived != (p.mask & ~exited)) {
        f.state = IN_WARP_OP;
        f.lane_op = &op;
        yield();
        f.lane_op = nullptr;
        return;
    }
    complete(L, warp, idx, int(lane));
}

}  // namespace

void lane_exited(Fiber& f) {
    Launch& L = *g_launch;
    const unsigned warp = f.linear / 32;
    const unsigned exited = exited_lanes(L, warp);
    for (size_t i = 0; i < L.warps[warp].pending.size();) {
        const Pending& p = L.warps[warp].pending[i];
        if (p.arrived == (p.mask & ~exited) && p.arrived != 0) {
            if (p.op == OP_MMA || p.op == OP_LDMATRIX)
                fail("%s: needs all 32 lanes of the warp (.aligned), but lane %u exited", op_name(p.op),
                     f.linear % 32);
            complete(L, warp, i, -1);
            continue;
        }
        ++i;
    }
}

void syncwarp(unsigned mask, const char*, int) {
    LaneOp op;
    op.op = OP_SYNCWARP;
    op.mask = mask;
    warp_collective(op);
}

uint32_t shfl(ShflKind kind, unsigned mask, uint32_t value, int lane_arg, int width) {
    if (width <= 0 || width > 32 || (width & (width - 1)))
        fail("__shfl_*_sync: width %d is not a power of two in 1..32", width);
    LaneOp op;
    op.op = OP_SHFL;
    op.variant = kind;
    op.mask = mask;
    op.in[0] = value;
    op.arg = lane_arg;
    op.width = width;
    warp_collective(op);
    return op.out[0];
}

void mma_m16n8k16(bool f16, float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
    LaneOp op;
    op.op = OP_MMA;
    op.variant = f16;
    op.mask = 0xffffffffu;
    for (int i = 0; i < 4; ++i) op.in[i] = a[i];
    op.in[4] = b[0];
    op.in[5] = b[1];
    for (int i = 0; i < 4; ++i) op.in[6 + i] = __float_as_uint(c[i]);
    warp_collective(op);
    for (int i = 0; i < 4; ++i) d[i] = __uint_as_float(op.out[i]);
}

void ldmatrix(int n, bool trans, uint32_t* regs, const void* row_addr) {
    LaneOp op;
    op.op = OP_LDMATRIX;
    op.variant = n * 2 + (trans ? 1 : 0);
    op.mask = 0xffffffffu;
    op.addr = row_addr;
    warp_collective(op);
    for (int j = 0; j < n; ++j) regs[j] = op.out[j];
}

}  // namespace lk_emu
