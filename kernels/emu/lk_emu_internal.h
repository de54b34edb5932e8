// lk_emu_internal.h: the emulator runtime's shared state, seen by its four parts and by no kernel:
//   lk_emu_sched.cpp  fibers, the block scheduler, __syncthreads, the launch entry point;
//   lk_emu_warp.cpp   warp collectives (shuffles, __syncwarp, ldmatrix, mma.sync);
//   lk_emu_async.cpp  cp.async copies and their groups;
//   lk_emu_check.cpp  the shared-memory race detector, shared-memory bounds, static shared memory, and
//                     memcheck/initcheck of global memory, fed by the compiler's access hooks.
#pragma once
#include <setjmp.h>
#include <ucontext.h>

#include <cstddef>
#include <cstdint>
#include <deque>
#include <string>
#include <vector>

#include "lk_emu.h"
#define LK_EMU_RUNTIME 1
#include "lk_emu_prelude.h"

namespace lk_emu {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardPage = 4096;
constexpr unsigned kMaxThreads = 1024;
constexpr unsigned kMaxDynSmem = 227 * 1024;   // sm_90's opt-in maximum per block
constexpr unsigned kMaxStaticSmem = 48 * 1024;  // static __shared__ per block, every architecture
constexpr unsigned kCanaryBytes = 256;          // after dynamic shared memory, checked at block end
constexpr uint8_t kCanaryByte = 0xA5;

enum State { READY, AT_BARRIER, IN_WARP_OP, DONE };
enum WarpOp { OP_NONE, OP_SHFL, OP_SYNCWARP, OP_LDMATRIX, OP_MMA };
const char* op_name(int op);

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
    uint32_t warp_sync = 0;  // sequence number of the last __syncwarp this lane completed
    std::vector<AsyncCopy> uncommitted;
    std::deque<std::vector<AsyncCopy>> groups;
};

// One collective in progress in a warp: the lanes of `mask` that arrived so far. Collectives with
// disjoint masks may be in progress at once (e.g. the two half-warps shuffling separately).
struct Pending {
    int op = OP_NONE;
    int variant = 0;
    unsigned mask = 0;
    unsigned arrived = 0;
    LaneOp* lanes[32] = {};
};

struct Warp {
    std::vector<Pending> pending;
    uint32_t sync_seq = 0;
};

// Per byte of the block's shared-memory window (dynamic, canary, static arena): the race detector's
// last writer and readers in the current barrier interval ("epoch"), and what the byte is.
struct SmemByte {
    uint32_t w_epoch = 0, r_epoch = 0;
    uint32_t w_sync = 0, r_sync = 0;
    uint16_t w_tid = 0, r_tid = 0;
    uint8_t flags = 0;
};
enum SmemFlags : uint8_t {
    SB_VALID = 1,        // inside dynamic shared memory or an allocated static variable
    SB_IN_FLIGHT = 2,    // destination of a cp.async not yet retired by its thread's wait_group
    SB_READ_WARPS = 4,   // read by threads of two or more warps in r_epoch
    SB_READ_LANES = 8,   // read by two or more lanes (of r_tid's warp) in r_epoch
};

struct StaticVar {
    const void* site;
    const char* name;
    size_t offset, bytes;
};

struct Launch {
    LkEmuBody body = nullptr;
    const void* params = nullptr;
    unsigned nthreads = 0;
    uint3 block_dim{}, grid_dim{}, block_idx{};
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    // shared memory window: [dynamic | canary | static arena]
    unsigned char* smem = nullptr;  // start of the window (= dynamic shared memory)
    size_t smem_bytes = 0;          // dynamic bytes
    size_t window_bytes = 0;
    size_t static_base = 0;         // offset of the static arena in the window
    size_t static_used = 0;         // bytes of the arena handed out (variables and their red zones)
    size_t static_var_bytes = 0;    // bytes of static variables alone (the 48 KB limit)
    size_t smem_limit = kMaxDynSmem;
    std::vector<StaticVar> static_vars;
    std::vector<unsigned char> window_storage;
    std::vector<SmemByte> shadow;
    uint32_t epoch = 0;
    const char* epoch_file = "block start";
    int epoch_line = 0;
    uint32_t mma_model = LK_EMU_MMA_EXACT;
    const LkEmuRegion* regions = nullptr;
    size_t region_count = 0;
    bool checks = true;
    std::string error;
};

extern thread_local Launch* g_launch;
extern thread_local Fiber* g_fiber;

std::string where(const Fiber& f);
std::string thread_name(unsigned linear);
void yield();

// lk_emu_warp.cpp
void lane_exited(Fiber& f);  // completes collectives that only waited for lanes that have now exited

// lk_emu_check.cpp
void check_begin_launch(Launch& L);
void check_begin_block(Launch& L);
bool check_end_block(Launch& L);  // false (L.error set) when a canary or red zone was written
void smem_access(const void* p, size_t n, bool write, unsigned tid);
void smem_async_issue(unsigned char* dst, unsigned tid);
void smem_async_land(unsigned char* dst, unsigned tid);
bool in_smem_window(const void* p, size_t n);
void global_access(const void* p, size_t n, bool write, const char* what);
void barrier_epoch(const char* file, int line);

}  // namespace lk_emu
