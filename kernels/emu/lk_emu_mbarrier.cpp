// lk_emu_mbarrier.cpp: mbarriers and bulk async copies in the emulator, and the happens-before mode of
// the race detector that they need.
//
// mbarrier (PTX ISA, "mbarrier"): an 8-byte shared-memory object with a phase, the arrivals still
// pending in it and a tx-count. A phase completes when both reach zero: the arrivals (mbarrier.arrive,
// arrive.expect_tx, which first adds its bytes to the tx-count) and the bytes of the bulk copies that
// signal it (complete_tx). try_wait.parity(P) succeeds once the phase of parity P has completed, i.e. while
// the current phase's parity differs from P. Here:
// - the object's state lives beside shared memory (keyed by its offset); a plain load or store of its 8
//   bytes is an error, so is any use of it before mbarrier.init or before the init is visible to the
//   thread (no __syncthreads after it), and a re-init while a phase is under way;
// - try_wait blocks the thread until the phase completes (a GPU's try_wait returns false after a time
//   limit; the kernel's loop calls it again) and fails spuriously now and then (drawn from the launch's
//   seed), as the ISA allows: a kernel must loop;
// - a deadlock is an error: every thread waiting, at an mbarrier or a barrier that cannot release, with no
//   bulk copy left in flight. The message gives the barrier's pending arrivals and tx-count (a wrong
//   expect_tx byte count shows there). A wait whose parity refers to a phase further back than the last
//   one is not flagged (a consumer may legitimately skip phases others consume); reading data of a phase
//   it did not wait for is then a race, as bulk-copy landings are ordered per barrier and phase;
// - arrivals beyond those pending and a tx-count outside ±(2^20 - 1) are errors.
// - fence.mbarrier_init is accepted and not checked (no cluster). fence.proxy.async is checked in part
//   (lk_emu_check.cpp check_proxy_fenced): a byte a thread stored and the async proxy (a wgmma, a bulk
//   tensor store) then reads must have been fenced by that thread after its store; whether the fence came
//   before the release that orders the read (as it must) is not checked.
//
// Bulk copies (cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes): the source is read
// (memcheck) at issue, the destination is checked as a write by the issuing thread (so a refill of a stage
// that other threads still read, without having waited for their release, is a race) and then is in
// flight: filled with 0xFF, any access to it an error. Copies land only when no thread can run, one at a
// time (oldest first; newest first under the descending orders), as late as a GPU may land them; each
// landing writes its bytes as the barrier's clock component at the phase it completes in, then completes
// its bytes on the mbarrier. A block that
// ends with copies in flight is an error.
//
// Happens-before mode: from a launch's first mbarrier.init on, every thread has a vector clock (one
// component per thread, one per warpgroup's wgmma agent, one per mbarrier for its bulk-copy landings). __syncthreads
// joins all clocks, __syncwarp the lanes', an arrive releases the thread's clock into the phase, a landing
// the agent's, and a successful wait acquires every completed phase (a wgmma.wait_group, its ops' reads). Shared-memory accesses are then ordered by these clocks
// (lk_emu_check.cpp), not by barrier intervals alone. In the first block of the launch, accesses made
// before the init and conflicting ones after it in the same barrier interval are checked conservatively
// (as unordered between threads, with several readers of a byte counted as one).

#include <cstdio>
#include <cstring>

#include "lk_emu_internal.h"

namespace lk_emu {

namespace {

constexpr uint32_t kMaxArrivals = (1u << 20) - 1;
constexpr int64_t kMaxTx = (int64_t(1) << 20) - 1;

void join(uint32_t* dst, const uint32_t* src, size_t n) {
    for (size_t i = 0; i < n; ++i) dst[i] = std::max(dst[i], src[i]);
}

}  // namespace

// Turns on happens-before mode for the rest of the launch: accesses of the current interval so far count
// as unordered with every other thread's (clock 1, which no other thread has acquired). Clock components:
// the threads, the warpgroups' wgmma agents (nthreads + g), the mbarriers' bulk-copy landings (bar_base + b).
void hb_enable(Launch& L) {
    if (L.hb) return;
    L.hb = true;
    const size_t groups = (L.nthreads + 127) / 128;
    L.bar_base = size_t(L.nthreads) + groups;
    L.vc_width = L.bar_base + kMaxBarriers;
    L.bar_offset.assign(kMaxBarriers, 0);
    L.vc.assign(L.nthreads * L.vc_width, 0);
    L.agent_clock.assign(groups, 0);
    for (unsigned t = 0; t < L.nthreads; ++t) hb_row(L, t)[t] = 1;
    for (SmemByte& s : L.shadow) {
        s.w_clock = s.w_epoch == L.epoch ? 1 : 0;
        s.r_clock = s.r_epoch == L.epoch ? 1 : 0;
        s.flags &= uint8_t(~(SB_READ_WARPS | SB_READ_LANES));
    }
}

namespace {

size_t bar_offset(const void* bar, const char* op) {
    if (!in_smem_window(bar, 8) || reinterpret_cast<uintptr_t>(bar) % 8 != 0)
        fail("%s: the mbarrier at %p is not an 8-byte aligned object in the block's shared memory", op, bar);
    return size_t(static_cast<const unsigned char*>(bar) - g_launch->smem);
}

MBarrier& barrier_at(size_t off, const char* op) {
    Launch& L = *g_launch;
    auto it = L.mbarriers.find(off);
    if (it == L.mbarriers.end())
        fail("%s on %s, which holds no initialised mbarrier (mbarrier.init it first)", op, smem_place(L, off).c_str());
    MBarrier& b = it->second;
    const unsigned tid = g_fiber->linear;
    if (b.init_tid != tid && hb_row(L, tid)[b.init_tid] < b.init_clock)
        fail("%s on the mbarrier at %s before its mbarrier.init by %s is visible to this thread (a __syncthreads "
             "after the init, and fence.mbarrier_init, must come between them)",
             op, smem_place(L, off).c_str(), thread_name(b.init_tid).c_str());
    return b;
}

void complete_phase(Launch& L, size_t off, MBarrier& b) {
    ++b.phase;
    join(b.done_vc.data(), b.vc.data(), L.vc_width);
    // the bulk copies that landed during the phase wrote as this barrier's component at phase + 1
    b.done_vc[L.bar_base + b.comp] = uint32_t(b.phase);
    std::fill(b.vc.begin(), b.vc.end(), 0u);
    b.pending = b.count;
    b.tx = 0;
    for (Fiber& f : L.fibers)
        if (f.state == AT_MBARRIER && f.wait_bar == off) f.state = READY;
}

void check_tx(const Launch& L, size_t off, const MBarrier& b, const char* op) {
    if (b.tx > kMaxTx || b.tx < -kMaxTx)
        fail("%s: the tx-count of the mbarrier at %s reaches %lld bytes, outside the ISA's ±%lld", op,
             smem_place(L, off).c_str(), static_cast<long long>(b.tx), static_cast<long long>(kMaxTx));
}

uint64_t arrive_on(size_t off, MBarrier& b, uint32_t count, const char* op) {
    Launch& L = *g_launch;
    const unsigned tid = g_fiber->linear;
    if (count == 0 || count > b.pending)
        fail("%s: %u arrival(s) on the mbarrier at %s, whose phase %llu has %u of %u pending (more threads arrive "
             "than mbarrier.init counted)",
             op, count, smem_place(L, off).c_str(), static_cast<unsigned long long>(b.phase), b.pending, b.count);
    const uint64_t state = b.phase;
    uint32_t* me = hb_row(L, tid);
    join(b.vc.data(), me, L.vc_width);
    ++me[tid];  // what this thread does after the arrive is not released by it
    b.pending -= count;
    if (b.pending == 0 && b.tx == 0) complete_phase(L, off, b);
    return state;
}

}  // namespace

void hb_begin_block(Launch& L) {
    L.mbarriers.clear();
    L.bulk_in_flight.clear();
    L.read_sets.clear();
    L.next_bar = 0;
    if (!L.hb) return;
    std::fill(L.vc.begin(), L.vc.end(), 0u);
    std::fill(L.agent_clock.begin(), L.agent_clock.end(), 0u);
    for (unsigned t = 0; t < L.nthreads; ++t) hb_row(L, t)[t] = 1;
    for (SmemByte& s : L.shadow) s.w_clock = s.r_clock = 0;  // the last block's accesses: ordered (clock 0)
}

void hb_join_all(Launch& L) {
    if (!L.hb) return;
    std::vector<uint32_t> all(L.vc_width, 0);
    for (unsigned t = 0; t < L.nthreads; ++t) join(all.data(), hb_row(L, t), L.vc_width);
    for (unsigned t = 0; t < L.nthreads; ++t) {
        uint32_t* row = hb_row(L, t);
        std::memcpy(row, all.data(), L.vc_width * sizeof(uint32_t));
        ++row[t];
    }
}

void hb_join_lanes(Launch& L, const unsigned* tids, unsigned n) {
    if (!L.hb) return;
    std::vector<uint32_t> all(L.vc_width, 0);
    for (unsigned i = 0; i < n; ++i) join(all.data(), hb_row(L, tids[i]), L.vc_width);
    for (unsigned i = 0; i < n; ++i) {
        uint32_t* row = hb_row(L, tids[i]);
        std::memcpy(row, all.data(), L.vc_width * sizeof(uint32_t));
        ++row[tids[i]];
    }
}

bool land_one_bulk_copy(Launch& L) {
    if (L.bulk_in_flight.empty()) return false;
    const bool newest = L.order == LK_EMU_ORDER_DESCENDING || L.order == LK_EMU_ORDER_WARP_GREEDY_DESCENDING;
    BulkCopy c = newest ? std::move(L.bulk_in_flight.back()) : std::move(L.bulk_in_flight.front());
    if (newest) L.bulk_in_flight.pop_back();
    else L.bulk_in_flight.pop_front();
    auto it = L.mbarriers.find(c.bar);
    if (it == L.mbarriers.end()) {
        L.error = "a bulk copy issued by " + thread_name(c.tid) + " completes on " + smem_place(L, c.bar) +
                  ", which no longer holds an mbarrier";
        return true;
    }
    MBarrier& b = it->second;
    // The landing writes as the barrier's component at the number of the phase it completes in (+1): only
    // a wait that sees that phase of that barrier complete acquires it (not another barrier's, not an
    // earlier phase's, not the issuer's program order).
    for (size_t i = 0; i < c.chunks.size(); ++i) {
        std::memcpy(L.smem + c.chunks[i], c.bytes.data() + 16 * i, 16);
        smem_bulk_land(c.chunks[i], 16, unsigned(L.bar_base + b.comp), uint32_t(b.phase + 1));
    }
    b.tx -= int64_t(c.bytes.size());
    if (b.tx < -kMaxTx) {
        L.error = "complete_tx of a bulk copy issued by " + thread_name(c.tid) + " takes the tx-count of the mbarrier at " +
                  smem_place(L, c.bar) + " below the ISA's -(2^20 - 1)";
        return true;
    }
    if (b.pending == 0 && b.tx == 0) complete_phase(L, c.bar, b);
    return true;
}

std::string mbarrier_deadlock(Launch& L) {
    // name a waiter whose barrier has an unbalanced tx-count if there is one: that is the likely cause
    const Fiber* pick = nullptr;
    for (const Fiber& f : L.fibers)
        if (f.state == AT_MBARRIER && (!pick || (L.mbarriers[f.wait_bar].tx != 0 && L.mbarriers[pick->wait_bar].tx == 0)))
            pick = &f;
    if (pick) {
        const Fiber& f = *pick;
        const MBarrier& b = L.mbarriers[f.wait_bar];
        char msg[640];
        const char* why = b.tx > 0 ? " (arrive.expect_tx announced more bytes than the bulk copies delivered?)"
                          : b.tx < 0 ? " (the bulk copies delivered more bytes than arrive.expect_tx announced?)"
                                     : "";
        std::snprintf(msg, sizeof msg,
                      "deadlock: %s waits on the mbarrier at %s for the phase of parity %u; its phase %llu still "
                      "misses %u of %u arrivals and has a tx-count of %lld bytes%s, and no thread can run and no bulk "
                      "copy is in flight",
                      where(f).c_str(), smem_place(L, f.wait_bar).c_str(), f.wait_parity,
                      static_cast<unsigned long long>(b.phase), b.pending, b.count, static_cast<long long>(b.tx), why);
        return msg;
    }
    return "deadlock: no thread can make progress";
}

bool mbarrier_end_block(Launch& L) {
    if (L.bulk_in_flight.empty()) return true;
    const BulkCopy& c = L.bulk_in_flight.front();
    L.error = "the block ended with " + std::to_string(L.bulk_in_flight.size()) +
              " bulk copies in flight (e.g. one issued by " + thread_name(c.tid) + " into " +
              smem_place(L, c.chunks.front()) + "): wait for their mbarrier phase before exiting";
    return false;
}

void mbarrier_init(void* bar, uint32_t count) {
    Launch& L = *g_launch;
    const size_t off = bar_offset(bar, "mbarrier.init");
    if (count == 0 || count > kMaxArrivals)
        fail("mbarrier.init: count %u is outside 1..2^20-1", count);
    hb_enable(L);
    const unsigned tid = g_fiber->linear;
    auto it = L.mbarriers.find(off);
    if (it != L.mbarriers.end()) {
        const MBarrier& b = it->second;
        bool waited = false;
        for (const Fiber& f : L.fibers) waited = waited || (f.state == AT_MBARRIER && f.wait_bar == off);
        if (b.pending != b.count || b.tx != 0 || waited)
            fail("mbarrier.init on the mbarrier at %s while its phase %llu is under way (%u of %u arrivals pending, "
                 "tx-count %lld)",
                 smem_place(L, off).c_str(), static_cast<unsigned long long>(b.phase), b.pending, b.count,
                 static_cast<long long>(b.tx));
        for (const BulkCopy& c : L.bulk_in_flight)
            if (c.bar == off) fail("mbarrier.init on the mbarrier at %s while a bulk copy that signals it is in flight",
                                   smem_place(L, off).c_str());
    }
    // the init writes the object: ordered after every earlier access to those bytes
    for (size_t i = 0; i < 8; ++i) L.shadow[off + i].flags &= uint8_t(~SB_MBARRIER);
    smem_access(bar, 8, true, tid);
    for (size_t i = 0; i < 8; ++i) L.shadow[off + i].flags |= SB_MBARRIER;
    std::memset(bar, 0xEE, 8);
    MBarrier b;
    b.count = b.pending = count;
    b.init_tid = tid;
    b.init_clock = hb_row(L, tid)[tid];
    b.init_epoch = L.epoch;
    b.vc.assign(L.vc_width, 0);
    b.done_vc.assign(L.vc_width, 0);
    if (L.next_bar >= kMaxBarriers)
        fail("mbarrier.init: more than %u mbarrier initialisations in one block are not emulated", kMaxBarriers);
    b.comp = L.next_bar++;
    L.bar_offset[b.comp] = off;
    L.mbarriers[off] = std::move(b);
}

uint64_t mbarrier_arrive(void* bar) {
    const size_t off = bar_offset(bar, "mbarrier.arrive");
    return arrive_on(off, barrier_at(off, "mbarrier.arrive"), 1, "mbarrier.arrive");
}

uint64_t mbarrier_arrive_expect_tx(void* bar, uint32_t bytes) {
    const char* op = "mbarrier.arrive.expect_tx";
    const size_t off = bar_offset(bar, op);
    MBarrier& b = barrier_at(off, op);
    b.tx += int64_t(bytes);
    check_tx(*g_launch, off, b, op);
    return arrive_on(off, b, 1, op);
}

bool mbarrier_try_wait_parity(void* bar, uint32_t parity) {
    const char* op = "mbarrier.try_wait.parity";
    Launch& L = *g_launch;
    const size_t off = bar_offset(bar, op);
    const unsigned tid = g_fiber->linear;
    if (parity > 1) fail("%s: phase parity %u is not 0 or 1", op, parity);
    for (;;) {
        MBarrier& b = barrier_at(off, op);
        if ((b.phase & 1) != parity) {
            if (splitmix(L.wait_rng) % 4 == 0) {  // a spurious failure: the kernel has to ask again
                yield();
                return false;
            }
            join(hb_row(L, tid), b.done_vc.data(), L.vc_width);
            return true;
        }
        g_fiber->state = AT_MBARRIER;
        g_fiber->wait_bar = off;
        g_fiber->wait_parity = parity;
        yield();
    }
}

void bulk_copy_g2s(void* smem_dst, const void* gmem_src, uint32_t bytes, void* bar) {
    const char* op = "cp.async.bulk (global to shared)";
    Launch& L = *g_launch;
    if (bytes == 0 || bytes % 16 != 0) fail("%s: size %u is not a positive multiple of 16", op, bytes);
    if (reinterpret_cast<uintptr_t>(smem_dst) % 16 != 0 || !in_smem_window(smem_dst, bytes))
        fail("%s: destination %p (%u bytes) is not 16-byte aligned inside the block's shared memory", op, smem_dst,
             bytes);
    if (reinterpret_cast<uintptr_t>(gmem_src) % 16 != 0) fail("%s: source %p is not 16-byte aligned", op, gmem_src);
    barrier_at(bar_offset(bar, op), op);
    global_access(gmem_src, bytes, false, "cp.async.bulk source");
    BulkCopy c;
    const size_t dst = size_t(static_cast<unsigned char*>(smem_dst) - L.smem);
    for (uint32_t i = 0; i < bytes; i += 16) c.chunks.push_back(dst + i);
    c.bytes.assign(static_cast<const unsigned char*>(gmem_src), static_cast<const unsigned char*>(gmem_src) + bytes);
    issue_bulk_copy(std::move(c), bar, op);
}

void issue_bulk_copy(BulkCopy&& c, void* bar, const char* op) {
    Launch& L = *g_launch;
    c.bar = bar_offset(bar, op);
    barrier_at(c.bar, op);
    c.tid = g_fiber->linear;
    for (size_t off : c.chunks) smem_bulk_issue(off, 16, c.tid);
    L.bulk_in_flight.push_back(std::move(c));
}

}  // namespace lk_emu
