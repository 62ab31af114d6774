// How the small-batch forward time loop (rnn_small_batch.h) shares its W_hh
// panels among its team: by measured speed, not evenly. One core can run the
// same panels at half the other's speed for a whole call (a VM whose cores
// another tenant loads too; a hybrid CPU's efficiency cores): on the 2-core
// Xeon of BENCHMARKS.md the two threads of a batch-1 LSTM forward (H = 128)
// took ~2,900 and ~5,800 cycles a step on 4 panels each, call after call for
// minutes at a time (at about one speed at other times). With an even split
// every step waits for the slower thread.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <x86intrin.h>
#endif

namespace attnkit {
namespace cpu {

// Steps between two splits (~50 us at H = 128): each thread reports the
// cycles it spent on its panels over these steps.
constexpr int64_t kSplitSteps = 16;

enum class SplitMode { kMeasured, kEven, kRotate };

// ATTNKIT_TEAM_SPLIT=even keeps the even split (A/B timings); =rotate moves
// half of one thread's panels to the next every kSplitSteps steps whatever
// the timings (the tests: units change owner mid-call, deterministically).
// Anything else, or unset: by measured speed. Read once per call.
inline SplitMode split_mode() {
  const char* forced = std::getenv("ATTNKIT_TEAM_SPLIT");
  if (forced != nullptr && std::strcmp(forced, "even") == 0) return SplitMode::kEven;
  if (forced != nullptr && std::strcmp(forced, "rotate") == 0) return SplitMode::kRotate;
  return SplitMode::kMeasured;
}

// A clock for the durations one thread measures (only its own differences are
// compared): the time-stamp counter where there is one (~25 cycles a read).
inline uint64_t busy_clock() {
#if defined(__x86_64__) || defined(__i386__)
  return __rdtsc();
#else
  return static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
#endif
}

// Thread i of the team owns panels [begin(i), end(i)) of `panels`, at least
// one each (the team is at most `panels` threads). Every thread of the team
// holds its own copy and updates it from the same published cycles, so all
// copies agree without a second barrier.
class TeamSplit {
 public:
  TeamSplit(int team, int64_t panels) : bounds_(team + 1) {
    for (int i = 0; i <= team; ++i) bounds_[i] = panels * i / team;
  }

  int64_t begin(int tid) const { return bounds_[tid]; }
  int64_t end(int tid) const { return bounds_[tid + 1]; }

  // The split for the next kSplitSteps steps (window: how many came before),
  // from busy[i], thread i's cycles on its panels over the last ones.
  void resplit(SplitMode mode, const uint64_t* busy, int64_t window) {
    const int team = static_cast<int>(bounds_.size()) - 1;
    if (team < 2 || mode == SplitMode::kEven) return;
    std::vector<int64_t> count(team);
    for (int i = 0; i < team; ++i) count[i] = end(i) - begin(i);
    if (mode == SplitMode::kRotate) {
      const int from = static_cast<int>(window % team);
      const int64_t moved = count[from] / 2;
      count[from] -= moved;
      count[(from + 1) % team] += moved;
    } else if (!by_speed(busy, count)) {
      return;
    }
    for (int i = 0; i < team; ++i) bounds_[i + 1] = bounds_[i] + count[i];
  }

 private:
  // Each panel goes, one at a time, to the thread that would finish it first
  // at its measured cycles per panel. False (count untouched) unless that
  // promises at least a tenth off the slowest thread's time: timer noise and
  // a stray interrupt should not move panels back and forth.
  static bool by_speed(const uint64_t* busy, std::vector<int64_t>& count) {
    const int team = static_cast<int>(count.size());
    std::vector<double> per_panel(team);
    double slowest = 0;
    int64_t panels = 0;
    for (int i = 0; i < team; ++i) {
      per_panel[i] = static_cast<double>(std::max<uint64_t>(busy[i], 1)) / static_cast<double>(count[i]);
      slowest = std::max(slowest, static_cast<double>(busy[i]));
      panels += count[i];
    }
    std::vector<int64_t> next(team, 1);
    for (int64_t p = team; p < panels; ++p) {
      int best = 0;
      for (int i = 1; i < team; ++i) {
        if ((next[i] + 1) * per_panel[i] < (next[best] + 1) * per_panel[best]) best = i;
      }
      ++next[best];
    }
    double predicted = 0;
    for (int i = 0; i < team; ++i) predicted = std::max(predicted, next[i] * per_panel[i]);
    if (predicted > 0.9 * slowest) return false;
    count = next;
    return true;
  }

  std::vector<int64_t> bounds_;
};

}  // namespace cpu
}  // namespace attnkit
