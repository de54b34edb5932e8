// lk_emu_internal.h: the emulator runtime's shared state, seen by its four parts and by no kernel:
//   lk_emu_sched.cpp  fibers, the block scheduler, __syncthreads, the launch entry point;
//   lk_emu_warp.cpp   warp collectives (shuffles, __syncwarp, ldmatrix, mma.sync);
//   lk_emu_async.cpp  cp.async copies and their groups;
//   lk_emu_mbarrier.cpp  mbarriers, bulk async copies (cp.async.bulk with complete_tx) and the vector
//                     clocks that order shared-memory accesses through them (happens-before mode);
//   lk_emu_tma.cpp    TMA: tensor-map copies global -> shared (swizzled, zero-filled out of bounds) and
//                     shared -> global (clipped), with their bulk groups;
//   lk_emu_wgmma.cpp  wgmma.mma_async and its fence/commit/wait (warpgroup rendezvous, descriptors);
//   lk_emu_check.cpp  the shared-memory race detector, shared-memory bounds, static shared memory, and
//                     memcheck/initcheck of global memory, fed by the compiler's access hooks.
#pragma once
#include <setjmp.h>
#include <ucontext.h>

#include <cstddef>
#include <cstdint>
#include <deque>
#include <string>
#include <unordered_map>
#include <utility>
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

enum State { READY, AT_BARRIER, IN_WARP_OP, AT_MBARRIER, DONE };
enum WarpOp { OP_NONE, OP_SHFL, OP_SYNCWARP, OP_LDMATRIX, OP_MMA };
const char* op_name(int op);

struct AsyncCopy {
    unsigned char* dst;
    unsigned char bytes[16];
};

// A bulk copy (cp.async.bulk ... mbarrier::complete_tx::bytes) between issue and completion: its source was
// read at issue, its destination is in flight until it lands (when no thread can run: as late as possible).
// Its destination is a list of 16-byte chunks (a tensor copy's box lands swizzled), 16 bytes each in `bytes`.
struct BulkCopy {
    std::vector<size_t> chunks;  // shared-memory offsets
    std::vector<unsigned char> bytes;
    size_t bar = 0;  // shared-memory offset of the mbarrier it signals
    unsigned tid = 0;
};

// A bulk tensor store (cp.async.bulk.tensor, shared to global) between issue and its wait_group: reads
// its shared-memory chunks (which may not be written meanwhile) and writes global memory when retired.
struct BulkStore {
    LkEmuTensorMap map;
    int32_t coords[5];
    unsigned char* src;
};

// One wgmma.mma_async of a warpgroup (128 threads) from issue to the wait_group that retires it in every
// thread (lk_emu_wgmma.cpp).
struct WgOp {
    unsigned n = 0;  // N of m64nNk16
    bool f16 = false, a_regs = false, accumulate = false;
    uint32_t trans_a = 0, trans_b = 0;
    uint64_t desc_a = 0, desc_b = 0;
    std::vector<uint32_t> a_frag;  // 128 × 4 when A comes from registers
    float* d[128] = {};            // each thread's accumulator registers
    std::vector<float> c_in;       // 128 × n/2: the accumulators at issue
    int prev = -1;                 // the earlier op still pending on the same accumulators (its result is C)
    int next = -1;                 // the later op that takes this one's result as C (see prev)
    std::vector<float> out;        // 128 × n/2 once computed; freed once no thread or later op needs it
    bool computed = false;
    unsigned retired = 0;          // threads whose wait retired it
    uint32_t clock = 0;            // its wgmma agent's clock: its reads; a wait that retires it acquires it
    std::vector<size_t> chunks;    // the 16-byte shared-memory chunks it reads
};

// What one thread brings to a wgmma.mma_async rendezvous.
struct WgArrival {
    float* d = nullptr;
    uint64_t desc_a = 0, desc_b = 0;
    uint32_t a[4] = {};
    uint32_t key[6] = {};  // n, f16, a_regs, accumulate, trans_a, trans_b: equal in all 128 threads
};

struct WgState {
    unsigned arrived = 0;
    WgArrival lanes[128];
    std::vector<WgOp> ops;  // every op this warpgroup issued in the block (indices stay valid; the
                            // register copies of those done with are freed)
    std::vector<std::pair<const float*, int>> last_on;  // the latest op on each accumulator array
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
    std::vector<BulkStore> stores_uncommitted;
    std::deque<std::vector<BulkStore>> store_groups;
    bool wg_fenced = false;   // wgmma.fence since the last wgmma.wait_group
    uint32_t proxy_fences = 0;  // fence.proxy.async executed so far
    std::vector<int> wg_uncommitted;
    std::deque<std::vector<int>> wg_groups;
    size_t wait_bar = 0;      // AT_MBARRIER: the shared-memory offset of the mbarrier it waits on
    uint32_t wait_parity = 0;  // ... and the parity it waits for
    bool dep_waited = false;   // griddepcontrol.wait executed (a dependent launch's global accesses need it)
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
// In happens-before mode (a launch that uses mbarriers) w_clock / r_clock are the accessing thread's own
// vector-clock component at the access, further readers of the interval live in Launch::read_sets, and an
// accessor id ≥ nthreads is an agent: a warpgroup's wgmma (nthreads + g) or an mbarrier's bulk-copy
// landings (bar_base + b).
struct SmemByte {
    uint32_t w_epoch = 0, r_epoch = 0;
    uint32_t w_sync = 0, r_sync = 0;
    uint32_t w_clock = 0, r_clock = 0;
    uint16_t w_tid = 0, r_tid = 0;
    uint8_t flags = 0;
    uint32_t w_proxy_fences = 0;  // SB_GENERIC_WRITE: the writer's Fiber::proxy_fences at the write
};
enum SmemFlags : uint8_t {
    SB_VALID = 1,        // inside dynamic shared memory or an allocated static variable
    SB_IN_FLIGHT = 2,    // destination of a cp.async not yet retired by its thread's wait_group
    SB_READ_WARPS = 4,   // read by threads of two or more warps in r_epoch
    SB_READ_LANES = 8,   // read by two or more lanes (of r_tid's warp) in r_epoch
    SB_MBARRIER = 16,    // one of the 8 bytes of an initialised mbarrier: only mbarrier instructions touch it
    SB_READ_SET = 32,    // happens-before mode: more readers of r_epoch in Launch::read_sets
    SB_ASYNC_SRC = 64,   // read by an async operation not yet complete (bulk tensor store, wgmma): no writes
    SB_GENERIC_WRITE = 128,  // last written by a thread's store (the generic proxy), not a copy's landing
};

// An mbarrier object (PTX ISA "Parallel synchronization and communication: mbarrier"): the phase in
// progress, its pending arrivals and tx-count, and the vector clocks that carry happens-before edges from
// the arrivals (and the bulk copies' complete_tx) of a phase to the threads whose try_wait sees it done.
struct MBarrier {
    uint32_t count = 0;    // expected arrivals per phase (mbarrier.init)
    uint32_t pending = 0;  // arrivals still missing in the current phase
    int64_t tx = 0;        // tx-count of the current phase: bytes announced by expect_tx minus bytes completed
    uint64_t phase = 0;    // phases completed so far (the current phase's parity is phase & 1)
    unsigned init_tid = 0;
    uint32_t init_clock = 0, init_epoch = 0;
    std::vector<uint32_t> vc;       // join of this phase's arrivals
    std::vector<uint32_t> done_vc;  // join of every completed phase's arrivals (what a successful wait acquires)
    unsigned comp = 0;              // its clock component (Launch::bar_base + comp): the phases completed
};

// mbarriers per block that can carry bulk-copy completions in happens-before mode (a clock component each)
constexpr unsigned kMaxBarriers = 64;


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
    bool dependent = false;  // LkEmuLaunch.dependent
    std::string error;
    // happens-before mode (on from a launch's first mbarrier.init to its end): per thread a vector clock of
    // width nthreads + warpgroups + kMaxBarriers (threads, wgmma agents, mbarriers' landings), row t at
    // vc[t * vc_width]
    bool hb = false;
    size_t vc_width = 0;
    std::vector<uint32_t> vc;
    std::vector<uint32_t> agent_clock;  // per wgmma agent (clock component - nthreads): its events so far
    size_t bar_base = 0;                // clock component of the block's first mbarrier (nthreads + groups)
    unsigned next_bar = 0;              // mbarrier.inits in this block so far
    std::vector<size_t> bar_offset;     // per barrier component: its shared-memory offset (for messages)
    std::unordered_map<size_t, std::vector<std::pair<uint16_t, uint32_t>>> read_sets;  // offset -> (reader, clock)
    std::unordered_map<size_t, MBarrier> mbarriers;  // by shared-memory offset, reset at block start
    std::deque<BulkCopy> bulk_in_flight;
    unsigned long long wait_rng = 0;  // draws the spurious try_wait failures
    size_t smem_misalign = 128;       // dynamic shared memory's offset from a multiple of 1024 (128·1..7)
    std::vector<uint16_t> async_readers;  // per window byte: async operations reading it (SB_ASYNC_SRC while > 0)
    std::vector<WgState> warpgroups;  // lk_emu_wgmma.cpp, per warpgroup of the block
    uint32_t order = 0;
};

// SplitMix64: the emulator's seeded draws (block and thread orders, spurious try_wait failures).
inline unsigned long long splitmix(unsigned long long& s) {
    unsigned long long z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

extern thread_local Launch* g_launch;
extern thread_local Fiber* g_fiber;

std::string where(const Fiber& f);
std::string thread_name(unsigned linear);
void yield();

// lk_emu_warp.cpp
void lane_exited(Fiber& f);  // completes collectives that only waited for lanes that have now exited
double b16_to_double(uint16_t v, bool f16);
float tensor_core_sum(const double* products, double c);  // 16 products + c, the tensor-core model

// lk_emu_check.cpp
void check_begin_launch(Launch& L);
void check_begin_block(Launch& L);
bool check_end_block(Launch& L);  // false (L.error set) when a canary or red zone was written
void smem_access(const void* p, size_t n, bool write, unsigned tid);
void smem_async_issue(unsigned char* dst, unsigned tid);
void smem_async_land(unsigned char* dst, unsigned tid);
bool in_smem_window(const void* p, size_t n);
void global_access(const void* p, size_t n, bool write, const char* what);
// A dependent launch (LkEmuLaunch.dependent): fails if this thread has not executed griddepcontrol.wait.
// global_access calls it; an asynchronous store, which touches global memory only when retired, calls it
// at issue.
void check_dependency_waited(const void* p, size_t n, bool write, const char* what);
void barrier_epoch(const char* file, int line);
void smem_bulk_issue(size_t off, size_t n, unsigned tid);
void smem_bulk_land(size_t off, size_t n, unsigned agent, uint32_t clock);
std::string smem_place(const Launch& L, size_t off);
std::string accessor_name(unsigned id);

// lk_emu_mbarrier.cpp
void hb_enable(Launch& L);  // happens-before mode from now to the end of the launch
void hb_begin_block(Launch& L);
void hb_join_all(Launch& L);                              // __syncthreads: every thread acquires every thread
void hb_join_lanes(Launch& L, const unsigned* tids, unsigned n);  // __syncwarp among these lanes
inline uint32_t* hb_row(Launch& L, unsigned tid) { return L.vc.data() + size_t(tid) * L.vc_width; }
bool land_one_bulk_copy(Launch& L);  // false when none is in flight
void issue_bulk_copy(BulkCopy&& c, void* bar, const char* op);  // checks the barrier and the destination

// lk_emu_check.cpp: async operations that read shared memory until they complete
void async_read_begin(size_t off, size_t n);
void async_read_end(size_t off, size_t n);
// happens-before mode: a read of [off, off + n) by `agent` at `clock`, checked against earlier writes with
// thread `checker`'s clock (the thread whose knowledge the agent starts from)
void smem_agent_read(size_t off, size_t n, unsigned checker, unsigned agent, uint32_t clock);
// a read of [off, off + n) by the async proxy (`what`: a wgmma, a bulk tensor store): a byte a thread stored
// must have been fenced (fence.proxy.async) by that thread since
void check_proxy_fenced(size_t off, size_t n, const char* what);
inline unsigned char* smem_zero(const Launch& L) { return L.smem - L.smem_misalign; }  // shared address 0

// lk_emu_wgmma.cpp
void wgmma_begin_block(Launch& L);
bool wgmma_thread_exit(Fiber& f);  // false when the thread exits with wgmma results not waited for

// lk_emu_tma.cpp
void retire_bulk_stores(Fiber& f, size_t keep);  // performs all but the newest `keep` committed groups
bool stores_pending(const Fiber& f);
std::string mbarrier_deadlock(Launch& L);
bool mbarrier_end_block(Launch& L);  // false (L.error set) when bulk copies are still in flight

}  // namespace lk_emu
