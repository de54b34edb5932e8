// lk_emu_sched.cpp: the emulator's scheduler. Runs a kernel compiled by the host compiler (with
// lk_emu_prelude.h force-included) block by block on the calling OS thread, one fiber per CUDA thread.
//
// How:
// - Fibers: each gets a context with makecontext once per launch and is entered with setcontext the first
//   time; every later switch is _setjmp/_longjmp (no signal-mask syscall). A fiber loops over blocks, so
//   one launch creates its fibers once. Each fiber stack has a PROT_NONE guard page below it, so a stack
//   overflow faults instead of corrupting the neighbouring fiber.
// - Scheduling: the scheduler resumes the ready fibers in the launch's order (ascending, descending, a
//   seeded shuffle, or warp-greedy: after a fiber, the ready lanes of its warp until the warp blocks); a
//   fiber runs until it blocks (barrier, warp collective) or finishes the block. Blocks run in linear
//   order, or in an order shuffled by the seed when it is non-zero.
// - __syncthreads: released when every thread waits at the same barrier (file:line); threads at different
//   barriers, or some threads exited while others wait, is an error (a hang or UB on a GPU). Each release
//   starts a new barrier interval for the race detector (lk_emu_check.cpp).
// - mbarrier waits block a fiber until the phase completes; when no fiber can run, one bulk copy in flight
//   lands (lk_emu_mbarrier.cpp), and only when none is left is it a deadlock.
// All state is thread_local: several OS threads (e.g. Rust's test threads) may run launches at once.

#include <sys/mman.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "lk_emu_internal.h"

namespace lk_emu {

thread_local ThreadCtx* current = nullptr;
thread_local Launch* g_launch = nullptr;
thread_local Fiber* g_fiber = nullptr;

namespace {

thread_local jmp_buf g_sched;
thread_local std::vector<char*> g_stacks;  // cached across launches of this OS thread

// A fiber stack with a PROT_NONE guard page below it (stacks grow down).
char* stack_for(size_t i) {
    while (g_stacks.size() <= i) {
        void* p = mmap(nullptr, kStackBytes + kGuardPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
        if (p == MAP_FAILED) return nullptr;
        if (mprotect(p, kGuardPage, PROT_NONE) != 0) return nullptr;
        g_stacks.push_back(static_cast<char*>(p) + kGuardPage);
    }
    return g_stacks[i];
}

void fiber_main() {
    for (;;) {
        g_launch->body(g_launch->params);
        if (!wgmma_thread_exit(*g_fiber))
            fail("the thread exits with wgmma.mma_async results it has not waited for (wgmma.commit_group, then "
                 "wgmma.wait_group)");
        if (stores_pending(*g_fiber))
            fail("the thread exits with bulk tensor stores it has not retired (cp.async.bulk.commit_group, then "
                 "cp.async.bulk.wait_group before the exit)");
        g_fiber->state = DONE;
        // pending cp.async copies of an exited thread are dropped: nothing waited for them
        g_fiber->uncommitted.clear();
        g_fiber->groups.clear();
        lane_exited(*g_fiber);
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

bool greedy(uint32_t order) {
    return order == LK_EMU_ORDER_WARP_GREEDY_ASCENDING || order == LK_EMU_ORDER_WARP_GREEDY_DESCENDING;
}

// After resuming fiber `first`, keeps resuming the ready lanes of its warp (in the order's direction)
// until none is ready. False when the launch failed.
bool run_warp_greedy(Launch& L, unsigned first, bool descending) {
    const unsigned base = first - first % 32, end = std::min(base + 32, L.nthreads);
    for (;;) {
        bool any = false;
        for (unsigned i = 0; i < end - base; ++i) {
            Fiber& g = L.fibers[descending ? end - 1 - i : base + i];
            if (g.state != READY) continue;
            any = true;
            resume(g);
            if (!L.error.empty()) return false;
        }
        if (!any) return true;
    }
}

// Runs one block to completion; false (with L.error set) on an error.
bool run_block(Launch& L, const LkEmuLaunch& cfg, unsigned long long block_linear) {
    check_begin_block(L);
    hb_begin_block(L);
    wgmma_begin_block(L);
    for (auto& w : L.warps) w = Warp{};
    const bool descending = cfg.order == LK_EMU_ORDER_DESCENDING || cfg.order == LK_EMU_ORDER_WARP_GREEDY_DESCENDING;
    std::vector<unsigned> order(L.nthreads);
    for (unsigned i = 0; i < L.nthreads; ++i) order[i] = descending ? L.nthreads - 1 - i : i;
    if (cfg.order == LK_EMU_ORDER_SHUFFLED) {
        unsigned long long s = cfg.seed ^ (block_linear * 0x2545F4914F6CDD1Dull);
        for (unsigned i = L.nthreads; i > 1; --i) std::swap(order[i - 1], order[splitmix(s) % i]);
    }
    for (auto& f : L.fibers) {
        f.state = READY;
        f.ctx.block_idx = L.block_idx;
        f.warp_sync = 0;
        f.dep_waited = false;
    }
    for (;;) {
        bool any_ready = false;
        for (unsigned idx : order) {
            Fiber& f = L.fibers[idx];
            if (f.state != READY) continue;
            any_ready = true;
            resume(f);
            if (!L.error.empty()) return false;
            if (greedy(cfg.order) && !run_warp_greedy(L, idx, descending)) return false;
        }
        if (any_ready) continue;
        unsigned done = 0, at_barrier = 0, in_warp = 0, at_mbarrier = 0;
        const Fiber* first_barrier = nullptr;
        for (auto& f : L.fibers) {
            done += f.state == DONE;
            in_warp += f.state == IN_WARP_OP;
            at_mbarrier += f.state == AT_MBARRIER;
            if (f.state == AT_BARRIER) {
                ++at_barrier;
                if (!first_barrier) first_barrier = &f;
            }
        }
        if (done == L.nthreads) return mbarrier_end_block(L) && check_end_block(L);
        char msg[512];
        if (in_warp == 0 && at_mbarrier == 0 && at_barrier > 0) {
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
            barrier_epoch(first_barrier->bar_file, first_barrier->bar_line);
            hb_join_all(L);
            for (auto& f : L.fibers) f.state = READY;
            continue;
        }
        // No thread can run: a bulk copy in flight lands now (possibly completing an mbarrier phase).
        if (land_one_bulk_copy(L)) {
            if (!L.error.empty()) return false;
            continue;
        }
        if (at_mbarrier > 0) {
            L.error = mbarrier_deadlock(L);
            return false;
        }
        // Deadlock: some lanes wait in a warp collective for lanes that wait at a barrier.
        for (auto& f : L.fibers) {
            if (f.state != IN_WARP_OP) continue;
            unsigned mask = 0, arrived = 0;
            int op = OP_NONE;
            for (const Pending& p : L.warps[f.linear / 32].pending)
                if (p.mask & (1u << (f.linear % 32))) mask = p.mask, arrived = p.arrived, op = p.op;
            if (op == OP_NONE)
                std::snprintf(msg, sizeof msg,
                              "deadlock: %s waits in its warpgroup's wgmma.mma_async for threads that wait "
                              "elsewhere (%u exited, %u at a barrier)",
                              where(f).c_str(), done, at_barrier);
            else
                std::snprintf(msg, sizeof msg,
                              "deadlock: %s waits in %s (mask 0x%08x, arrived 0x%08x) for lanes that wait at "
                              "__syncthreads or in another collective (%u exited, %u at a barrier)",
                              where(f).c_str(), op_name(op), mask, arrived, done, at_barrier);
            L.error = msg;
            return false;
        }
        L.error = "deadlock: no thread can make progress";
        return false;
    }
}

}  // namespace

std::string thread_name(unsigned linear) {
    const Launch& L = *g_launch;
    char buf[64];
    std::snprintf(buf, sizeof buf, "thread (%u,%u,%u) [warp %u lane %u]", linear % L.block_dim.x,
                  (linear / L.block_dim.x) % L.block_dim.y, linear / (L.block_dim.x * L.block_dim.y), linear / 32,
                  linear % 32);
    return buf;
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

void fail(const char* fmt, ...) {
    char msg[1024];
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

unsigned char* dyn_smem() { return g_launch->smem; }

void grid_dependency_wait() { g_fiber->dep_waited = true; }

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
    // the hardware's limits (CUDA_ERROR_INVALID_VALUE on a GPU): x < 2^31, y and z at most 65535
    if (cfg->grid[0] > 0x7fffffffu || cfg->grid[1] > 65535u || cfg->grid[2] > 65535u)
        return report("grid of " + std::to_string(cfg->grid[0]) + " x " + std::to_string(cfg->grid[1]) + " x " +
                      std::to_string(cfg->grid[2]) + " blocks; a GPU allows x < 2^31, y and z <= 65535");
    const size_t limit = cfg->smem_limit ? cfg->smem_limit : kMaxDynSmem;
    if (cfg->dyn_smem_bytes > limit)
        return report("dynamic shared memory of " + std::to_string(cfg->dyn_smem_bytes) +
                      " bytes; the target architecture allows at most " + std::to_string(limit) + " per block");

    Launch L;
    L.body = body;
    L.params = params;
    L.nthreads = unsigned(threads);
    L.block_dim = uint3{cfg->block[0], cfg->block[1], cfg->block[2]};
    L.grid_dim = uint3{cfg->grid[0], cfg->grid[1], cfg->grid[2]};
    L.smem_bytes = cfg->dyn_smem_bytes;
    L.smem_limit = limit;
    L.mma_model = cfg->mma_model;
    L.regions = cfg->regions;
    L.region_count = size_t(cfg->region_count);
    L.checks = cfg->checks != 0;
    L.dependent = cfg->dependent != 0;
    L.order = cfg->order;
    L.smem_misalign = 128 * (1 + size_t(cfg->seed % 7));
    L.wait_rng = cfg->seed ^ 0x6d62617272696572ull;
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
    check_begin_launch(L);

    // Block order: linear, or a permutation drawn from the seed.
    const unsigned long long nblocks = 1ull * L.grid_dim.x * L.grid_dim.y * L.grid_dim.z;
    std::vector<unsigned long long> blocks(nblocks);
    for (unsigned long long b = 0; b < nblocks; ++b) blocks[b] = b;
    if (cfg->seed != 0) {
        unsigned long long s = cfg->seed * 0x9E3779B97F4A7C15ull + 1;
        for (unsigned long long i = nblocks; i > 1; --i) std::swap(blocks[i - 1], blocks[splitmix(s) % i]);
    }
    g_launch = &L;
    bool ok = true;
    for (unsigned long long b : blocks) {
        L.block_idx = uint3{unsigned(b % L.grid_dim.x), unsigned((b / L.grid_dim.x) % L.grid_dim.y),
                            unsigned(b / (1ull * L.grid_dim.x * L.grid_dim.y))};
        ok = run_block(L, *cfg, b);
        if (!ok) break;
    }
    g_launch = nullptr;
    if (!ok) return report(L.error);
    return 0;
}
