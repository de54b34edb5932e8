// lk_emu_check.cpp: what the emulator checks on every memory access a kernel makes.
//
// The kernel files (not this runtime) are compiled with -fsanitize=thread, which makes GCC call
// __tsan_read{1,2,4,8,16}(addr) / __tsan_write*(addr) before every load and store that may touch memory
// (no libtsan is linked: the hooks are defined below). ldmatrix, cp.async and the checked memcpy of the
// prelude report their accesses here directly. Each access is classified by address:
//
// - the block's shared-memory window [dynamic | canary | static arena]: bounds (dynamic size, the canary
//   after it, the red zones around each static variable) and the race detector;
// - the current fiber's stack, the emulator's own thread context (threadIdx & co): nothing to check;
// - anything else is global memory: it must lie inside one allocation the launch was given (memcheck),
//   a write must go to an output, and a read must only see bytes that were written (initcheck).
//
// Race detector: per shared-memory byte, the last writer and the readers in the current barrier interval
// (epoch; every __syncthreads release and every block start opens a new one). Two accesses by different
// threads in one interval of which one is a write are a hazard (read-after-write, write-after-read,
// write-after-write), unless both threads are lanes of one warp that completed a __syncwarp in between.
// A cp.async destination is in flight from issue to the wait that retires it: any access then is an error.
// The detector sees intra-block races only: inter-block races and fence/memory-model bugs go unseen.

#include <link.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "lk_emu_internal.h"

namespace lk_emu {

namespace {

constexpr size_t kRedZone = 32;             // bytes of red zone before and after each static variable
constexpr size_t kStaticArena = 56 * 1024;  // 48 KB of variables plus their red zones

thread_local uintptr_t g_pc = 0;  // code address of the access being checked (for the report)

size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

// "fn at file:line" for a code address, through addr2line when it is installed; "" otherwise.
std::string symbolize(uintptr_t pc) {
    if (!pc) return "";
    struct Find {
        uintptr_t pc, base;
        std::string path;
        bool found;
    } find{pc, 0, "", false};
    dl_iterate_phdr(
        [](dl_phdr_info* info, size_t, void* data) {
            auto* f = static_cast<Find*>(data);
            for (int i = 0; i < info->dlpi_phnum; ++i) {
                const auto& ph = info->dlpi_phdr[i];
                if (ph.p_type != PT_LOAD) continue;
                const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
                if (f->pc >= lo && f->pc < lo + ph.p_memsz) {
                    f->base = info->dlpi_addr;
                    f->path = info->dlpi_name && info->dlpi_name[0] ? info->dlpi_name : "/proc/self/exe";
                    f->found = true;
                    return 1;
                }
            }
            return 0;
        },
        &find);
    if (!find.found) return "";
    if (find.path == "/proc/self/exe") {  // the main program: its real path (in the shell, /proc/self is not us)
        char exe[400];
        const ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
        if (len <= 0) return "";
        exe[len] = 0;
        find.path = exe;
    }
    char cmd[512];
    std::snprintf(cmd, sizeof cmd, "addr2line -C -f -e '%s' 0x%lx 2>/dev/null", find.path.c_str(),
                  static_cast<unsigned long>(pc - 1 - find.base));
    FILE* p = popen(cmd, "r");
    if (!p) return "";
    char fn[256] = {}, line[512] = {};
    const bool ok = std::fgets(fn, sizeof fn, p) && std::fgets(line, sizeof line, p);
    pclose(p);
    if (!ok) return "";
    fn[std::strcspn(fn, "\n")] = 0;
    line[std::strcspn(line, "\n")] = 0;
    if (std::strcmp(fn, "??") == 0) return "";
    std::string out = std::string(" [in ") + fn;
    if (std::strncmp(line, "??", 2) != 0) out += std::string(" at ") + line;
    return out + "]";
}

std::string place_of(const Launch& L, size_t off) {
    char buf[160];
    if (off < L.smem_bytes) {
        std::snprintf(buf, sizeof buf, "dynamic shared memory offset %zu", off);
        return buf;
    }
    if (off < L.static_base) {
        std::snprintf(buf, sizeof buf, "%zu bytes past the end of dynamic shared memory (%zu bytes), in its canary",
                      off - L.smem_bytes, L.smem_bytes);
        return buf;
    }
    const StaticVar* near = nullptr;
    size_t dist = SIZE_MAX;
    for (const StaticVar& v : L.static_vars) {  // the variable whose extent is nearest
        const size_t d = off < v.offset ? v.offset - off : off >= v.offset + v.bytes ? off - v.offset - v.bytes : 0;
        if (d < dist) dist = d, near = &v;
        if (off >= v.offset && off < v.offset + v.bytes) {
            std::snprintf(buf, sizeof buf, "static __shared__ `%s` offset %zu", v.name, off - v.offset);
            return buf;
        }
    }
    if (near && off >= near->offset + near->bytes)
        std::snprintf(buf, sizeof buf, "%zu bytes past the end of static __shared__ `%s` (%zu bytes)",
                      off - near->offset - near->bytes, near->name, near->bytes);
    else if (near)
        std::snprintf(buf, sizeof buf, "%zu bytes before static __shared__ `%s`", near->offset - off, near->name);
    else
        std::snprintf(buf, sizeof buf, "static shared memory offset %zu (no variable there)", off - L.static_base);
    return buf;
}

[[noreturn]] void hazard(const char* kind, size_t off, size_t n, bool write, unsigned tid, unsigned other,
                         const char* other_did) {
    const Launch& L = *g_launch;
    const std::string site = L.epoch_line ? std::string(L.epoch_file) + ":" + std::to_string(L.epoch_line)
                                          : std::string(L.epoch_file);
    fail("shared-memory race (%s) at %s: %s %s %zu bytes while %s %s it in the same barrier interval (since %s)%s",
         kind, place_of(L, off).c_str(), thread_name(tid).c_str(), write ? "writes" : "reads", n,
         thread_name(other).c_str(), other_did, site.c_str(), symbolize(g_pc).c_str());
}

// Happens-before mode: an earlier access by `id` (a thread, or an agent when id ≥ nthreads) at
// `clock`, in barrier interval `epoch`, is ordered before thread `tid`'s access now. A thread's access in an
// earlier interval is (the __syncthreads between joined every clock); an agent's only through the clocks:
// a bulk copy that landed before a __syncthreads is not ordered by it on a GPU.
inline bool hb_ordered(Launch& L, unsigned id, uint32_t clock, uint32_t epoch, unsigned tid) {
    if (id == tid) return true;
    if (id < L.nthreads && epoch != L.epoch) return true;
    return hb_row(L, tid)[id] >= clock;
}

[[noreturn]] void hazard_hb(const char* kind, size_t off, size_t n, bool write, unsigned tid, unsigned other,
                            const char* other_did) {
    const Launch& L = *g_launch;
    fail("shared-memory race (%s) at %s: %s %s %zu bytes while %s %s it with no happens-before order between "
         "them (no __syncthreads, __syncwarp or mbarrier wait after that access)%s",
         kind, place_of(L, off).c_str(), thread_name(tid).c_str(), write ? "writes" : "reads", n,
         accessor_name(other).c_str(), other_did, symbolize(g_pc).c_str());
}

// The first read of a byte in a new barrier interval: the earlier interval's thread readers are ordered by
// the barrier and dropped; agents' (wgmma) reads are kept, only a wait_group orders them.
void new_interval_readers(Launch& L, SmemByte& s, size_t at) {
    if (!(s.flags & SB_READ_SET)) return;
    auto& set = L.read_sets[at];
    set.erase(std::remove_if(set.begin(), set.end(),
                             [&](const std::pair<uint16_t, uint32_t>& r) { return r.first < L.nthreads; }),
              set.end());
    if (set.empty()) {
        L.read_sets.erase(at);
        s.flags &= uint8_t(~SB_READ_SET);
    }
}

// A thread's store to a byte (not an async copy's issue, whose landing writes it): the async proxy may read
// it only after a fence.proxy.async by that thread (check_proxy_fenced). The landings of cp.async (the
// non-bulk copy) are not flagged either, though the ISA may count them as the generic proxy's: no kernel
// here feeds a wgmma or a bulk store from cp.async.
inline void note_generic_write(const Launch& L, SmemByte& s, unsigned tid, bool async_issue) {
    if (async_issue) {
        s.flags &= uint8_t(~SB_GENERIC_WRITE);
        return;
    }
    s.flags |= SB_GENERIC_WRITE;
    s.w_proxy_fences = L.fibers[tid].proxy_fences;
}

// One byte (`at`) of an access of n bytes at `off`, in happens-before mode (FastTrack-like: one reader
// inline, further unordered readers of the interval in L.read_sets).
void check_byte_hb(size_t off, size_t at, size_t n, bool write, unsigned tid, bool async_issue) {
    Launch& L = *g_launch;
    const uint32_t E = L.epoch;
    const uint32_t me = hb_row(L, tid)[tid];
    {
        const size_t i = at - off;
        SmemByte& s = L.shadow[at];
        if (!hb_ordered(L, s.w_tid, s.w_clock, s.w_epoch, tid))
            hazard_hb(write ? "write-after-write" : "read-after-write", off + i, n, write, tid, s.w_tid, "writes");
        const bool reads_now = s.r_epoch == E;
        if (write) {
            const char* kind = async_issue ? "write-after-read, by an async copy" : "write-after-read";
            // readers of this interval, and agents' (wgmma) reads from any interval: a __syncthreads does not
            // order an async read that only a wait_group acquires
            const bool slot_counts = s.r_epoch != 0 && (reads_now || s.r_tid >= L.nthreads);
            if (slot_counts && !hb_ordered(L, s.r_tid, s.r_clock, s.r_epoch, tid))
                hazard_hb(kind, off + i, n, write, tid, s.r_tid, "reads");
            if (s.flags & SB_READ_SET) {
                for (const auto& r : L.read_sets[off + i])
                    if ((reads_now || r.first >= L.nthreads) && !hb_ordered(L, r.first, r.second, E, tid))
                        hazard_hb(kind, off + i, n, write, tid, r.first, "reads");
                L.read_sets.erase(off + i);
                s.flags &= uint8_t(~SB_READ_SET);
            }
            s.w_epoch = E;
            s.w_tid = uint16_t(tid);
            s.w_clock = me;
            note_generic_write(L, s, tid, async_issue);
            s.r_epoch = 0;  // every read so far is ordered before this write: later writes check the write
        } else if (!reads_now || s.r_tid == tid || hb_ordered(L, s.r_tid, s.r_clock, s.r_epoch, tid)) {
            if (!reads_now) new_interval_readers(L, s, off + i);
            if (s.r_epoch != 0 && s.r_tid >= L.nthreads && !hb_ordered(L, s.r_tid, s.r_clock, s.r_epoch, tid)) {
                L.read_sets[off + i].emplace_back(s.r_tid, s.r_clock);  // an agent's read this one does not order
                s.flags |= SB_READ_SET;
            }
            s.r_epoch = E;
            s.r_tid = uint16_t(tid);
            s.r_clock = me;
        } else {  // a second reader not ordered after the first: keep both
            auto& set = L.read_sets[off + i];
            s.flags |= SB_READ_SET;
            bool found = false;
            for (auto& r : set)
                if (r.first == tid) r.second = me, found = true;
            if (!found) set.emplace_back(uint16_t(tid), me);
        }
    }
}

// Accesses by lanes of one warp are ordered when both completed a __syncwarp after the earlier one.
bool warp_ordered(const Launch& L, unsigned a, unsigned b, uint32_t sync_at_access) {
    if (a / 32 != b / 32) return false;
    return L.fibers[a].warp_sync > sync_at_access && L.fibers[b].warp_sync > sync_at_access;
}

void check_smem_bytes(size_t off, size_t n, bool write, unsigned tid, bool async_issue) {
    Launch& L = *g_launch;
    const uint32_t E = L.epoch;
    const uint32_t my_sync = L.fibers[tid].warp_sync;
    for (size_t i = 0; i < n; ++i) {
        SmemByte& s = L.shadow[off + i];
        if (!(s.flags & SB_VALID))
            fail("shared-memory %s of %zu bytes out of bounds: %s%s", write ? "write" : "read", n,
                 place_of(L, off + i).c_str(), symbolize(g_pc).c_str());
        if (s.flags & SB_IN_FLIGHT)
            fail("shared-memory race (async copy in flight) at %s: %s %s %zu bytes while an async copy issued by %s "
                 "is still in flight (a cp.async not yet retired by that thread's cp.async.wait_group, or a bulk "
                 "copy whose mbarrier phase this thread has not waited for)%s",
                 place_of(L, off + i).c_str(), thread_name(tid).c_str(), write ? "writes" : "reads", n,
                 thread_name(s.w_tid).c_str(), symbolize(g_pc).c_str());
        if (write && (s.flags & SB_ASYNC_SRC))
            fail("shared-memory write of %zu bytes at %s, which an async operation still reads (a bulk tensor store "
                 "not retired by cp.async.bulk.wait_group.read, or a wgmma not waited for with wgmma.wait_group)%s",
                 n, place_of(L, off + i).c_str(), symbolize(g_pc).c_str());
        if (s.flags & SB_MBARRIER)
            fail("shared-memory %s of %zu bytes at %s: those bytes hold an mbarrier, which only mbarrier instructions "
                 "may access (mbarrier.init again to reuse them as data)%s",
                 write ? "write" : "read", n, place_of(L, off + i).c_str(), symbolize(g_pc).c_str());
        if (L.hb) {
            check_byte_hb(off, off + i, n, write, tid, async_issue);
            continue;
        }
        if (s.w_epoch == E && s.w_tid != tid && !warp_ordered(L, s.w_tid, tid, s.w_sync))
            hazard(write ? "write-after-write" : "read-after-write", off + i, n, write, tid, s.w_tid, "writes");
        if (write) {
            if (s.r_epoch == E) {
                const bool other_warp = (s.flags & SB_READ_WARPS) || s.r_tid / 32 != tid / 32;
                const bool other_lane = (s.flags & SB_READ_LANES) || s.r_tid != tid;
                if (other_warp || (other_lane && my_sync <= s.r_sync))
                    hazard(async_issue ? "write-after-read, by a cp.async" : "write-after-read", off + i, n, write,
                           tid, s.r_tid, "reads");
            }
            s.w_epoch = E;
            s.w_tid = uint16_t(tid);
            s.w_sync = my_sync;
            note_generic_write(L, s, tid, async_issue);
        } else if (s.r_epoch != E) {
            s.r_epoch = E;
            s.r_tid = uint16_t(tid);
            s.r_sync = my_sync;
            s.flags &= uint8_t(~(SB_READ_WARPS | SB_READ_LANES));
        } else if (s.r_tid != tid) {
            if (s.r_tid / 32 != tid / 32) s.flags |= SB_READ_WARPS;
            else s.flags |= SB_READ_LANES;
            s.r_sync = std::max(s.r_sync, my_sync);
        }
    }
}

const LkEmuRegion* find_region(const Launch& L, uintptr_t a) {
    for (size_t i = 0; i < L.region_count; ++i) {
        const LkEmuRegion& r = L.regions[i];
        if (a >= r.base && a - r.base < r.len) return &r;
    }
    return nullptr;
}

[[noreturn]] void outside(const Launch& L, uintptr_t a, size_t n, bool write, const char* what) {
    const LkEmuRegion* near = nullptr;
    uintptr_t dist = UINTPTR_MAX;
    bool before = false;
    for (size_t i = 0; i < L.region_count; ++i) {
        const LkEmuRegion& r = L.regions[i];
        const bool b = a < r.base;
        const uintptr_t d = b ? r.base - a : a - (r.base + r.len);
        if (d < dist) dist = d, near = &r, before = b;
    }
    char rel[200] = "no allocation was passed to this launch";
    if (near && before)
        std::snprintf(rel, sizeof rel, "%lu bytes before the start of argument `%s` (%lu bytes)",
                      static_cast<unsigned long>(dist), near->name, static_cast<unsigned long>(near->len));
    else if (near)
        std::snprintf(rel, sizeof rel, "offset %lu of argument `%s`, which has %lu bytes",
                      static_cast<unsigned long>(a - near->base), near->name, static_cast<unsigned long>(near->len));
    fail("out-of-bounds global %s%s%s of %zu bytes at %p: outside every allocation of this launch; nearest: %s%s",
         write ? "write" : "read", what ? " by " : "", what ? what : "", n, reinterpret_cast<void*>(a), rel,
         symbolize(g_pc).c_str());
}

// The hook behind every instrumented access of kernel code.
inline void on_access(const void* p, size_t n, bool write, uintptr_t pc) {
    Launch* L = g_launch;
    if (!L || !g_fiber || !L->checks) return;  // not inside a kernel (e.g. a static constructor), or unchecked
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    const uintptr_t smem = reinterpret_cast<uintptr_t>(L->smem);
    if (a - smem < L->window_bytes) {
        g_pc = pc;
        if (a + n > smem + L->window_bytes)
            fail("shared-memory access of %zu bytes at %s straddles the end of the block's shared memory", n,
                 place_of(*L, a - smem).c_str());
        check_smem_bytes(a - smem, n, write, g_fiber->linear, false);
        return;
    }
    const uintptr_t stack = reinterpret_cast<uintptr_t>(g_fiber->stack);
    if (a - stack < kStackBytes) return;
    const uintptr_t ctx = reinterpret_cast<uintptr_t>(L->fibers.data());
    if (a - ctx < L->fibers.size() * sizeof(Fiber) || a == reinterpret_cast<uintptr_t>(&current)) return;
    g_pc = pc;
    global_access(p, n, write, nullptr);
}

}  // namespace

std::string smem_place(const Launch& L, size_t off) { return place_of(L, off); }

std::string accessor_name(unsigned id) {
    const Launch& L = *g_launch;
    if (id < L.nthreads) return thread_name(id);
    if (id >= L.bar_base && L.bar_base > 0)
        return "a bulk copy completing on the mbarrier at " + place_of(L, L.bar_offset[id - L.bar_base]);
    return "the wgmma.mma_async of warpgroup " + std::to_string(id - L.nthreads) +
           " (its reads last until its wgmma.wait_group)";
}

void smem_agent_read(size_t off, size_t n, unsigned checker, unsigned agent, uint32_t clock) {
    Launch& L = *g_launch;
    if (!L.checks) return;
    g_pc = 0;
    const uint32_t E = L.epoch;
    for (size_t i = 0; i < n; ++i) {
        SmemByte& s = L.shadow[off + i];
        if (!(s.flags & SB_VALID)) fail("shared-memory read of %zu bytes out of bounds: %s", n, place_of(L, off + i).c_str());
        if (s.flags & SB_IN_FLIGHT)
            fail("shared-memory race (async copy in flight) at %s: %s reads it while an async copy issued by %s is "
                 "still in flight",
                 place_of(L, off + i).c_str(), accessor_name(agent).c_str(), thread_name(s.w_tid).c_str());
        if (!hb_ordered(L, s.w_tid, s.w_clock, s.w_epoch, checker))
            hazard_hb("read-after-write", off + i, n, false, checker, s.w_tid, "writes");
        // the agent joins the readers (it is never ordered after another reader)
        if (s.r_epoch != E) {
            new_interval_readers(L, s, off + i);
            if (s.r_epoch != 0 && s.r_tid >= L.nthreads && s.r_tid != agent) {
                L.read_sets[off + i].emplace_back(s.r_tid, s.r_clock);
                s.flags |= SB_READ_SET;
            }
            s.r_epoch = E;
            s.r_tid = uint16_t(agent);
            s.r_clock = clock;
        } else if (s.r_tid == agent) {
            s.r_clock = clock;
        } else {
            auto& set = L.read_sets[off + i];
            s.flags |= SB_READ_SET;
            bool found = false;
            for (auto& r : set)
                if (r.first == agent) r.second = clock, found = true;
            if (!found) set.emplace_back(uint16_t(agent), clock);
        }
    }
}

void check_proxy_fenced(size_t off, size_t n, const char* what) {
    Launch& L = *g_launch;
    if (!L.checks) return;
    for (size_t i = 0; i < n; ++i) {
        const SmemByte& s = L.shadow[off + i];
        if ((s.flags & SB_GENERIC_WRITE) && s.w_tid < L.nthreads &&
            L.fibers[s.w_tid].proxy_fences == s.w_proxy_fences)
            fail("shared memory at %s, written by %s with a store (the generic proxy), is read by %s (the async "
                 "proxy) with no fence.proxy.async by that thread after its store (lk_fence_proxy_async)",
                 place_of(L, off + i).c_str(), thread_name(s.w_tid).c_str(), what);
    }
}

void fence_proxy_async() {
    if (g_fiber) ++g_fiber->proxy_fences;
}

void async_read_begin(size_t off, size_t n) {
    Launch& L = *g_launch;
    if (L.async_readers.size() != L.window_bytes) L.async_readers.assign(L.window_bytes, 0);
    for (size_t i = 0; i < n; ++i) {
        ++L.async_readers[off + i];
        L.shadow[off + i].flags |= SB_ASYNC_SRC;
    }
}

void async_read_end(size_t off, size_t n) {
    Launch& L = *g_launch;
    for (size_t i = 0; i < n; ++i)
        if (L.async_readers[off + i] > 0 && --L.async_readers[off + i] == 0)
            L.shadow[off + i].flags &= uint8_t(~SB_ASYNC_SRC);
}

void smem_bulk_issue(size_t off, size_t n, unsigned tid) {
    Launch& L = *g_launch;
    g_pc = 0;
    if (L.checks) check_smem_bytes(off, n, true, tid, true);
    for (size_t i = 0; i < n; ++i) L.shadow[off + i].flags |= SB_IN_FLIGHT;
    std::memset(L.smem + off, 0xFF, n);  // reading it before the copy completes sees NaN
}

void smem_bulk_land(size_t off, size_t n, unsigned agent, uint32_t clock) {
    Launch& L = *g_launch;
    for (size_t i = 0; i < n; ++i) {
        SmemByte& s = L.shadow[off + i];
        s.flags &= uint8_t(~(SB_IN_FLIGHT | SB_READ_SET | SB_GENERIC_WRITE));
        L.read_sets.erase(off + i);
        s.w_epoch = L.epoch;
        s.w_tid = uint16_t(agent);
        s.w_clock = clock;
        s.r_epoch = 0;
    }
}

bool in_smem_window(const void* p, size_t n) {
    const Launch& L = *g_launch;
    auto* c = static_cast<const unsigned char*>(p);
    return L.smem && c >= L.smem && c + n <= L.smem + L.window_bytes;
}

void check_begin_launch(Launch& L) {
    L.static_base = round_up(L.smem_bytes, 128) + round_up(kCanaryBytes, 128);
    L.window_bytes = L.static_base + kStaticArena;
    // dynamic shared memory starts 128·k bytes past a multiple of 1024 (k = 1..7, seeded): the 128-byte
    // alignment kernels declare, and no more (TMA's swizzle patterns follow absolute address bits)
    L.window_storage.assign(L.window_bytes + 2048, 0);
    L.smem = reinterpret_cast<unsigned char*>(((reinterpret_cast<uintptr_t>(L.window_storage.data()) + 1023) &
                                               ~uintptr_t(1023)) +
                                              L.smem_misalign);
    L.shadow.assign(L.window_bytes, SmemByte{});
    for (size_t i = 0; i < L.smem_bytes; ++i) L.shadow[i].flags = SB_VALID;
    L.epoch = 0;
}

void check_begin_block(Launch& L) {
    barrier_epoch("block start", 0);
    std::memset(L.smem, 0xFF, L.smem_bytes);
    std::memset(L.smem + L.smem_bytes, kCanaryByte, L.static_base - L.smem_bytes);
    std::memset(L.smem + L.static_base, kCanaryByte, L.static_used);
    for (const StaticVar& v : L.static_vars) std::memset(L.smem + v.offset, 0xFF, v.bytes);
    const size_t used = L.static_base + L.static_used;
    for (size_t i = 0; i < used; ++i) L.shadow[i].flags &= SB_VALID;  // copies of the last block never landed
    if (!L.async_readers.empty()) std::fill(L.async_readers.begin(), L.async_readers.end(), uint16_t(0));
}

bool check_end_block(Launch& L) {
    const size_t used = L.static_base + L.static_used;
    for (size_t off = L.smem_bytes; off < used; ++off) {
        if (L.shadow[off].flags & SB_VALID) continue;
        if (L.smem[off] != kCanaryByte) {
            L.error = "shared memory at " + place_of(L, off) +
                      " was written (canary/red zone changed by the end of block (" + std::to_string(L.block_idx.x) +
                      "," + std::to_string(L.block_idx.y) + "," + std::to_string(L.block_idx.z) + "))";
            return false;
        }
    }
    return true;
}

void barrier_epoch(const char* file, int line) {
    Launch& L = *g_launch;
    ++L.epoch;
    L.epoch_file = file;
    L.epoch_line = line;
}

void smem_access(const void* p, size_t n, bool write, unsigned tid) {
    const Launch& L = *g_launch;
    if (!L.checks) return;
    g_pc = 0;
    check_smem_bytes(static_cast<const unsigned char*>(p) - L.smem, n, write, tid, false);
}

void smem_async_issue(unsigned char* dst, unsigned tid) {
    Launch& L = *g_launch;
    g_pc = 0;
    const size_t off = size_t(dst - L.smem);
    if (L.checks) check_smem_bytes(off, 16, true, tid, true);
    for (size_t i = 0; i < 16; ++i) L.shadow[off + i].flags |= SB_IN_FLIGHT;
    std::memset(dst, 0xFF, 16);  // reading it before the wait sees NaN
}

void smem_async_land(unsigned char* dst, unsigned tid) {
    Launch& L = *g_launch;
    const size_t off = size_t(dst - L.smem);
    for (size_t i = 0; i < 16; ++i) {
        SmemByte& s = L.shadow[off + i];
        s.flags &= uint8_t(~(SB_IN_FLIGHT | SB_GENERIC_WRITE));
        s.w_epoch = L.epoch;
        s.w_tid = uint16_t(tid);
        s.w_sync = L.fibers[tid].warp_sync;
        if (L.hb) s.w_clock = hb_row(L, tid)[tid];  // the landing, not the issue: released only after the wait
    }
}

void check_dependency_waited(const void* p, size_t n, bool write, const char* what) {
    const Launch& L = *g_launch;
    if (!L.checks || !L.dependent || !g_fiber || g_fiber->dep_waited) return;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    const LkEmuRegion* r = find_region(L, a);
    char at[200];
    if (r)
        std::snprintf(at, sizeof at, "offset %lu of argument `%s`", static_cast<unsigned long>(a - r->base), r->name);
    else
        std::snprintf(at, sizeof at, "%p", p);
    fail("global %s%s%s of %zu bytes at %s before this thread's griddepcontrol.wait: on a GPU that launches "
         "kernels with programmatic dependent launch (compute capability 9.0 and later) the kernel before it "
         "in the stream may still be running; begin the kernel with LK_KERNEL_ENTRY()%s",
         write ? "write" : "read", what ? " by " : "", what ? what : "", n, at, what ? "" : symbolize(g_pc).c_str());
}

void global_access(const void* p, size_t n, bool write, const char* what) {
    const Launch& L = *g_launch;
    if (!L.checks) return;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    check_dependency_waited(p, n, write, what);
    const LkEmuRegion* r = find_region(L, a);
    if (!r) outside(L, a, n, write, what);
    const uint64_t off = a - r->base;
    if (off + n > r->len)
        fail("out-of-bounds global %s%s%s of %zu bytes at offset %lu of argument `%s` straddles its end (%lu bytes)%s",
             write ? "write" : "read", what ? " by " : "", what ? what : "", n, static_cast<unsigned long>(off),
             r->name, static_cast<unsigned long>(r->len), symbolize(g_pc).c_str());
    if (write) {
        if (!r->writable)
            fail("global write of %zu bytes at offset %lu of argument `%s`, which this launch passes as a read-only "
                 "input%s",
                 n, static_cast<unsigned long>(off), r->name, symbolize(g_pc).c_str());
        if (r->init) std::memset(r->init + off, 1, n);
    } else if (r->init) {
        for (size_t i = 0; i < n; ++i)
            if (!r->init[off + i])
                fail("global read%s%s of %zu bytes at offset %lu of argument `%s`: byte %lu was never written "
                     "(uninitialised device memory)%s",
                     what ? " by " : "", what ? what : "", n, static_cast<unsigned long>(off), r->name,
                     static_cast<unsigned long>(off + i), symbolize(g_pc).c_str());
    }
}

void* static_smem(const void* site, size_t bytes, size_t align, const char* name) {
    Launch& L = *g_launch;
    for (const StaticVar& v : L.static_vars)
        if (v.site == site) return L.smem + v.offset;
    align = std::max<size_t>(align, 16);
    const size_t off = round_up(L.static_base + L.static_used + kRedZone, align);
    if (L.static_var_bytes + bytes > kMaxStaticSmem)
        fail("static __shared__ `%s` (%zu bytes) brings the block's static shared memory to %zu bytes; at most %u "
             "(48 KB) per block",
             name, bytes, L.static_var_bytes + bytes, kMaxStaticSmem);
    if (L.static_var_bytes + bytes + L.smem_bytes > L.smem_limit)
        fail("static __shared__ `%s`: %zu bytes of static and %zu of dynamic shared memory exceed the target "
             "architecture's %zu bytes per block",
             name, L.static_var_bytes + bytes, L.smem_bytes, L.smem_limit);
    if (off + bytes + kRedZone > L.window_bytes) fail("static __shared__ `%s`: too many static variables", name);
    L.static_vars.push_back(StaticVar{site, name, off, bytes});
    L.static_var_bytes += bytes;
    std::memset(L.smem + L.static_base + L.static_used, kCanaryByte, off + bytes + kRedZone - L.static_base - L.static_used);
    L.static_used = off + bytes + kRedZone - L.static_base;
    std::memset(L.smem + off, 0xFF, bytes);
    for (size_t i = 0; i < bytes; ++i) L.shadow[off + i].flags = SB_VALID;
    return L.smem + off;
}

void checked_copy(void* dst, const void* src, size_t n) {
    if (n == 0) return;
    on_access(src, n, false, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));
    on_access(dst, n, true, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));
    std::memmove(dst, src, n);
}

void checked_fill(void* dst, int value, size_t n) {
    if (n == 0) return;
    on_access(dst, n, true, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));
    std::memset(dst, value, n);
}

}  // namespace lk_emu

// ---- the hooks GCC's -fsanitize=thread instrumentation calls (no libtsan is linked) ----
#define LK_PC reinterpret_cast<uintptr_t>(__builtin_return_address(0))
#define LK_HOOKS(N)                                                                                             \
    extern "C" void __tsan_read##N(void* p) { lk_emu::on_access(p, N, false, LK_PC); }                         \
    extern "C" void __tsan_write##N(void* p) { lk_emu::on_access(p, N, true, LK_PC); }                         \
    extern "C" void __tsan_unaligned_read##N(void* p) { lk_emu::on_access(p, N, false, LK_PC); }               \
    extern "C" void __tsan_unaligned_write##N(void* p) { lk_emu::on_access(p, N, true, LK_PC); }               \
    extern "C" void __tsan_volatile_read##N(void* p) { lk_emu::on_access(p, N, false, LK_PC); }                \
    extern "C" void __tsan_volatile_write##N(void* p) { lk_emu::on_access(p, N, true, LK_PC); }
LK_HOOKS(1)
LK_HOOKS(2)
LK_HOOKS(4)
LK_HOOKS(8)
LK_HOOKS(16)
#undef LK_HOOKS
extern "C" void __tsan_read_range(void* p, unsigned long n) { lk_emu::on_access(p, n, false, LK_PC); }
extern "C" void __tsan_write_range(void* p, unsigned long n) { lk_emu::on_access(p, n, true, LK_PC); }
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}
extern "C" void __tsan_init() {}
#undef LK_PC
