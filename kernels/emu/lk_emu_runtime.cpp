// lk_emu_runtime.cpp: the CPU emulator's runtime. Runs a kernel compiled by the host compiler (with
// lk_emu_prelude.h force-included) block by block on the calling OS thread, one fiber per CUDA thread.
//
// How:
// - Fibers: each gets a context with makecontext once per launch and is entered with setcontext the first
//   time; every later switch is _setjmp/_longjmp (no signal-mask syscall). A fiber loops over blocks, so
//   one launch creates its fibers once.
// - Scheduling: the scheduler resumes the ready fibers in the launch's order (ascending, descending or a
//   seeded shuffle); a fiber runs until it blocks (barrier, warp collective) or finishes the block.
// - __syncthreads: released when every thread waits at the same barrier (file:line); threads at different
//   barriers, or some threads exited while others wait, is an error (a hang or UB on a GPU).
// - Warp collectives (shuffles, ldmatrix, mma): every lane deposits its operands and blocks; the last lane
//   to arrive computes for the whole warp with the PTX ISA fragment layouts and releases the others.
//   Different ops or masks within a warp are an error; a lane that never arrives is reported as a deadlock.
// - cp.async copies read their source when issued and land in shared memory only at the cp.async.wait_group
//   that covers them, so a missing wait reads the poison.
// - Dynamic shared memory is filled with 0xFF (NaN in f32/bf16/f16) at every block start.
// All state is thread_local: several OS threads (e.g. Rust's test threads) may run launches at once.

#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <string>
#include <vector>

#include "lk_emu.h"
#include "lk_emu_prelude.h"

namespace lk_emu {

thread_local ThreadCtx* current = nullptr;

namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr unsigned kMaxThreads = 1024;
constexpr unsigned kMaxDynSmem = 227 * 1024;

enum State { READY, AT_BARRIER, IN_WARP_OP, DONE };
enum WarpOp { OP_NONE, OP_SHFL, OP_SYNCWARP, OP_LDMATRIX, OP_MMA };
const char* op_name(int op) {
    switch (op) {
        case OP_SHFL: return "__shfl_*_sync";
        case OP_SYNCWARP: return "__syncwarp";
        case OP_LDMATRIX: return "ldmatrix";
        case OP_MMA: return "mma.sync";
        default: return "none";
    }
}

struct AsyncCopy {
    unsigned char* dst;
    unsigned char bytes[16];
};

// What one lane brings to a warp collective and gets back (lives on the lane's fiber stack).
struct LaneOp {
    int op = OP_NONE;
    int variant = 0;  // shfl kind | ldmatrix n*2+trans | mma f16
    unsigned mask = 0;
    uint32_t in[10] = {};
    int arg = 0, width = 32;
    const void* addr = nullptr;
    uint32_t out[4] = {};
};

struct Fiber {
    ThreadCtx ctx;
    unsigned linear = 0;
    State state = READY;
    bool started = false;
    jmp_buf jb;
    ucontext_t uc;
    char* stack = nullptr;
    const char* bar_file = nullptr;
    int bar_line = 0;
    LaneOp* lane_op = nullptr;
    std::vector<AsyncCopy> uncommitted;
    std::deque<std::vector<AsyncCopy>> groups;
};

struct Warp {
    int op = OP_NONE;
    int variant = 0;
    unsigned mask = 0;
    unsigned arrived = 0;
    LaneOp* lanes[32] = {};
};

struct Launch {
    LkEmuBody body = nullptr;
    const void* params = nullptr;
    unsigned nthreads = 0;
    uint3 block_dim{}, grid_dim{}, block_idx{};
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    unsigned char* smem = nullptr;
    size_t smem_bytes = 0;
    std::string error;
};

thread_local Launch* g_launch = nullptr;
thread_local Fiber* g_fiber = nullptr;
thread_local jmp_buf g_sched;
thread_local std::vector<char*> g_stacks;  // cached across launches of this OS thread

char* stack_for(size_t i) {
    while (g_stacks.size() <= i) {
        void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) return nullptr;
        g_stacks.push_back(static_cast<char*>(p));
    }
    return g_stacks[i];
}

std::string where(const Fiber& f) {
    char buf[96];
    std::snprintf(buf, sizeof buf, "thread (%u,%u,%u) of block (%u,%u,%u)", f.ctx.thread_idx.x, f.ctx.thread_idx.y,
                  f.ctx.thread_idx.z, f.ctx.block_idx.x, f.ctx.block_idx.y, f.ctx.block_idx.z);
    return buf;
}

// Back to the scheduler; the fiber resumes here when rescheduled.
void yield() {
    if (!_setjmp(g_fiber->jb)) _longjmp(g_sched, 1);
}

void fiber_main() {
    for (;;) {
        g_launch->body(g_launch->params);
        g_fiber->state = DONE;
        if (!g_fiber->uncommitted.empty() || !g_fiber->groups.empty()) {
            // pending cp.async copies of an exited thread are dropped: nothing waited for them
            g_fiber->uncommitted.clear();
            g_fiber->groups.clear();
        }
        yield();
    }
}

void resume(Fiber& f) {
    g_fiber = &f;
    current = &f.ctx;
    if (!_setjmp(g_sched)) {
        if (!f.started) {
            f.started = true;
            setcontext(&f.uc);
        }
        _longjmp(f.jb, 1);
    }
    g_fiber = nullptr;
    current = nullptr;
}

bool in_smem(const void* p, size_t bytes) {
    auto* c = static_cast<const unsigned char*>(p);
    return g_launch->smem && c >= g_launch->smem && c + bytes <= g_launch->smem + g_launch->smem_bytes;
}

uint16_t load_b16(const unsigned char* p) {
    uint16_t v;
    std::memcpy(&v, p, 2);
    return v;
}

float b16_to_float(uint16_t v, bool f16) {
    if (f16) return __half2float(__half{v});
    return __bfloat162float(__nv_bfloat16{v});
}

// ---- the warp computations, run by the last lane to arrive ----

void compute_shfl(Warp& w) {
    uint32_t vals[32];
    for (int l = 0; l < 32; ++l) vals[l] = w.lanes[l] ? w.lanes[l]->in[0] : 0;
    for (int l = 0; l < 32; ++l) {
        LaneOp* op = w.lanes[l];
        if (!op) continue;
        int width = op->width, seg = l & ~(width - 1), src = l;
        switch (op->variant) {
            case SHFL_IDX: src = seg + (op->arg & (width - 1)); break;
            case SHFL_UP: src = (l - seg) >= op->arg ? l - op->arg : l; break;
            case SHFL_DOWN: src = (l - seg) + op->arg < width ? l + op->arg : l; break;
            case SHFL_XOR: src = l ^ op->arg; if ((src & ~(width - 1)) != seg) src = l; break;
        }
        if (src < 0 || src > 31 || !w.lanes[src])
            fail("__shfl_*_sync: lane %d reads lane %d, which is not in the mask 0x%08x", l, src, w.mask);
        op->out[0] = vals[src];
    }
}

void compute_ldmatrix(Warp& w) {
    const int n = w.variant >> 1;
    const bool trans = w.variant & 1;
    for (int l = 0; l < 8 * n; ++l) {
        const void* a = w.lanes[l]->addr;
        if (!in_smem(a, 16) || reinterpret_cast<uintptr_t>(a) % 16 != 0)
            fail("ldmatrix: lane %d row address %p is not a 16-byte aligned row inside the block's dynamic shared "
                 "memory [%p, +%zu)", l, a, static_cast<void*>(g_launch->smem), g_launch->smem_bytes);
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

void compute_mma(Warp& w) {
    const bool f16 = w.variant;
    double a[16][16], b[16][8], c[16][8];
    for (int l = 0; l < 32; ++l) {
        const uint32_t* in = w.lanes[l]->in;  // a0..a3, b0..b1, c0..c3 (c as float bits)
        const int g = l / 4, t = l % 4;
        for (int e = 0; e < 8; ++e) {
            const int reg = e / 2, half = e % 2;
            const int row = g + 8 * (reg & 1), col = t * 2 + half + 8 * (reg >= 2);
            a[row][col] = b16_to_float(uint16_t(in[reg] >> (16 * half)), f16);
        }
        for (int e = 0; e < 4; ++e) {
            const int reg = e / 2, half = e % 2;
            b[t * 2 + half + 8 * reg][g] = b16_to_float(uint16_t(in[4 + reg] >> (16 * half)), f16);
        }
        for (int i = 0; i < 4; ++i) c[g + 8 * (i >= 2)][t * 2 + (i & 1)] = __uint_as_float(in[6 + i]);
    }
    for (int l = 0; l < 32; ++l) {
        const int g = l / 4, t = l % 4;
        for (int i = 0; i < 4; ++i) {
            const int row = g + 8 * (i >= 2), col = t * 2 + (i & 1);
            double acc = 0.0;  // exact products, summed in double, one rounding to f32 at the end
            for (int k = 0; k < 16; ++k) acc += a[row][k] * b[k][col];
            w.lanes[l]->out[i] = __float_as_uint(float(acc + c[row][col]));
        }
    }
}

// A lane joins a warp collective; returns once the warp's last lane has computed the result.
void warp_collective(LaneOp& op) {
    Fiber& f = *g_fiber;
    Launch& L = *g_launch;
    const unsigned lane = f.linear % 32;
    Warp& w = L.warps[f.linear / 32];
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
    if (w.op == OP_NONE) {
        w.op = op.op;
        w.variant = op.variant;
        w.mask = op.mask;
        w.arrived = 0;
        for (auto& p : w.lanes) p = nullptr;
    } else if (w.op != op.op || w.variant != op.variant || w.mask != op.mask) {
        fail("mismatched warp collectives in warp %u: %s (lane %u) does %s/%d with mask 0x%08x while other lanes do "
             "%s/%d with mask 0x%08x", f.linear / 32, where(f).c_str(), lane, op_name(op.op), op.variant, op.mask,
             op_name(w.op), w.variant, w.mask);
    }
    w.lanes[lane] = &op;
    w.arrived |= 1u << lane;
    if (w.arrived != w.mask) {
        f.state = IN_WARP_OP;
        f.lane_op = &op;
        yield();
        f.lane_op = nullptr;
        return;
    }
    switch (w.op) {
        case OP_SHFL: compute_shfl(w); break;
        case OP_LDMATRIX: compute_ldmatrix(w); break;
        case OP_MMA: compute_mma(w); break;
        default: break;
    }
    for (unsigned l = 0; l < 32; ++l)
        if ((w.mask & (1u << l)) && l != lane) L.fibers[warp_base + l].state = READY;
    w.op = OP_NONE;
}

unsigned long long splitmix(unsigned long long& s) {
    unsigned long long z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Runs one block to completion; false (with L.error set) on an error.
bool run_block(Launch& L, const LkEmuLaunch& cfg, unsigned long long block_linear) {
    std::memset(L.smem, 0xFF, L.smem_bytes);
    for (auto& w : L.warps) w = Warp{};
    std::vector<unsigned> order(L.nthreads);
    for (unsigned i = 0; i < L.nthreads; ++i) order[i] = cfg.order == 1 ? L.nthreads - 1 - i : i;
    if (cfg.order == 2) {
        unsigned long long s = cfg.seed ^ (block_linear * 0x2545F4914F6CDD1Dull);
        for (unsigned i = L.nthreads; i > 1; --i) std::swap(order[i - 1], order[splitmix(s) % i]);
    }
    for (auto& f : L.fibers) {
        f.state = READY;
        f.ctx.block_idx = L.block_idx;
    }
    for (;;) {
        bool any_ready = false;
        for (unsigned idx : order) {
            Fiber& f = L.fibers[idx];
            if (f.state != READY) continue;
            any_ready = true;
            resume(f);
            if (!L.error.empty()) return false;
        }
        if (any_ready) continue;
        unsigned done = 0, at_barrier = 0, in_warp = 0;
        const Fiber* first_barrier = nullptr;
        for (auto& f : L.fibers) {
            done += f.state == DONE;
            in_warp += f.state == IN_WARP_OP;
            if (f.state == AT_BARRIER) {
                ++at_barrier;
                if (!first_barrier) first_barrier = &f;
            }
        }
        if (done == L.nthreads) return true;
        char msg[512];
        if (in_warp == 0 && at_barrier > 0) {
            if (done > 0) {
                std::snprintf(msg, sizeof msg,
                              "partial __syncthreads: %u threads exited while %u wait at %s:%d (e.g. %s)", done,
                              at_barrier, first_barrier->bar_file, first_barrier->bar_line,
                              where(*first_barrier).c_str());
                L.error = msg;
                return false;
            }
            for (auto& f : L.fibers) {
                if (f.bar_line != first_barrier->bar_line || std::strcmp(f.bar_file, first_barrier->bar_file) != 0) {
                    std::snprintf(msg, sizeof msg, "divergent __syncthreads: %s waits at %s:%d, %s at %s:%d",
                                  where(*first_barrier).c_str(), first_barrier->bar_file, first_barrier->bar_line,
                                  where(f).c_str(), f.bar_file, f.bar_line);
                    L.error = msg;
                    return false;
                }
            }
            for (auto& f : L.fibers) f.state = READY;
            continue;
        }
        // Deadlock: some lanes wait in a warp collective for lanes that exited or wait at a barrier.
        for (auto& f : L.fibers) {
            if (f.state != IN_WARP_OP) continue;
            const Warp& w = L.warps[f.linear / 32];
            std::snprintf(msg, sizeof msg,
                          "deadlock: %s waits in %s (mask 0x%08x, arrived 0x%08x) for lanes that exited or wait at "
                          "__syncthreads (%u exited, %u at a barrier)",
                          where(f).c_str(), op_name(w.op), w.mask, w.arrived, done, at_barrier);
            L.error = msg;
            return false;
        }
        L.error = "deadlock: no thread can make progress";
        return false;
    }
}

}  // namespace

void fail(const char* fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (!g_launch || !g_fiber) {
        std::fprintf(stderr, "lk_emu: %s (outside an emulated kernel)\n", msg);
        std::abort();
    }
    g_launch->error = where(*g_fiber) + ": " + msg;
    _longjmp(g_sched, 2);
}

void syncthreads(const char* file, int line) {
    g_fiber->state = AT_BARRIER;
    g_fiber->bar_file = file;
    g_fiber->bar_line = line;
    yield();
}

void syncwarp(unsigned mask, const char*, int) {
    LaneOp op;
    op.op = OP_SYNCWARP;
    op.mask = mask;
    warp_collective(op);
}

unsigned char* dyn_smem() { return g_launch->smem; }

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

void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes) {
    if (src_bytes < 0 || src_bytes > 16) fail("cp.async: src-size %d is outside 0..16", src_bytes);
    if (!in_smem(smem_dst, 16) || reinterpret_cast<uintptr_t>(smem_dst) % 16 != 0)
        fail("cp.async: destination %p is not 16-byte aligned inside the block's dynamic shared memory", smem_dst);
    if (src_bytes > 0 && reinterpret_cast<uintptr_t>(gmem_src) % 16 != 0)
        fail("cp.async: source %p is not 16-byte aligned", gmem_src);
    AsyncCopy c;
    c.dst = static_cast<unsigned char*>(smem_dst);
    std::memset(c.bytes, 0, 16);
    if (src_bytes > 0) std::memcpy(c.bytes, gmem_src, size_t(src_bytes));
    g_fiber->uncommitted.push_back(c);
}

void cp_async_commit() {
    g_fiber->groups.push_back(std::move(g_fiber->uncommitted));
    g_fiber->uncommitted.clear();
}

void cp_async_wait(int n) {
    auto& groups = g_fiber->groups;
    while (groups.size() > size_t(n < 0 ? 0 : n)) {
        for (const AsyncCopy& c : groups.front()) std::memcpy(c.dst, c.bytes, 16);
        groups.pop_front();
    }
}

}  // namespace lk_emu

extern "C" int lk_emu_launch(LkEmuBody body, const void* params, const LkEmuLaunch* cfg, char* err, size_t err_len) {
    using namespace lk_emu;
    auto report = [&](const std::string& msg) {
        if (err && err_len) {
            std::strncpy(err, msg.c_str(), err_len - 1);
            err[err_len - 1] = 0;
        }
        return 1;
    };
    if (g_launch) return report("lk_emu_launch called from inside an emulated kernel");
    const unsigned long long threads = 1ull * cfg->block[0] * cfg->block[1] * cfg->block[2];
    if (threads == 0 || threads > kMaxThreads)
        return report("block of " + std::to_string(threads) + " threads; expected 1..=1024");
    if (cfg->grid[0] == 0 || cfg->grid[1] == 0 || cfg->grid[2] == 0) return report("grid has a zero dimension");
    if (cfg->dyn_smem_bytes > kMaxDynSmem)
        return report("dynamic shared memory of " + std::to_string(cfg->dyn_smem_bytes) + " bytes; at most 232448");

    Launch L;
    L.body = body;
    L.params = params;
    L.nthreads = unsigned(threads);
    L.block_dim = uint3{cfg->block[0], cfg->block[1], cfg->block[2]};
    L.grid_dim = uint3{cfg->grid[0], cfg->grid[1], cfg->grid[2]};
    L.smem_bytes = cfg->dyn_smem_bytes;
    std::vector<unsigned char> smem_storage(L.smem_bytes + 128);
    L.smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_storage.data()) + 127) & ~uintptr_t(127));
    L.fibers.resize(L.nthreads);
    L.warps.resize((L.nthreads + 31) / 32);
    for (unsigned i = 0; i < L.nthreads; ++i) {
        Fiber& f = L.fibers[i];
        f.linear = i;
        f.ctx.block_dim = L.block_dim;
        f.ctx.grid_dim = L.grid_dim;
        f.ctx.thread_idx = uint3{i % L.block_dim.x, (i / L.block_dim.x) % L.block_dim.y, i / (L.block_dim.x * L.block_dim.y)};
        f.stack = stack_for(i);
        if (!f.stack) return report("could not map a fiber stack");
        getcontext(&f.uc);
        f.uc.uc_stack.ss_sp = f.stack;
        f.uc.uc_stack.ss_size = kStackBytes;
        f.uc.uc_link = nullptr;
        makecontext(&f.uc, fiber_main, 0);
    }
    g_launch = &L;
    bool ok = true;
    unsigned long long block_linear = 0;
    for (unsigned z = 0; ok && z < L.grid_dim.z; ++z)
        for (unsigned y = 0; ok && y < L.grid_dim.y; ++y)
            for (unsigned x = 0; ok && x < L.grid_dim.x; ++x, ++block_linear) {
                L.block_idx = uint3{x, y, z};
                ok = run_block(L, *cfg, block_linear);
            }
    g_launch = nullptr;
    if (!ok) return report(L.error);
    return 0;
}
