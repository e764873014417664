"""Sign-in throttling: failed passwords make the next try wait, per address and per account and address.

Two counters slow down password guessing: one per client address (whatever
account it tries) and one per (account, address) pair. After a few free
failures each further try must wait twice as long as the one before, up to a
cap. There is deliberately no counter per account alone: guesses from one
address would then lock the real person out from theirs. A flood from one
address only ever slows that address.

A refused try costs nothing: it is answered before the slow argon2 check, so a
flood cannot keep the CPU busy and delay everyone else's sign-in. A try counts
as a failure from the moment it is admitted until its password is found
right: otherwise a burst of simultaneous tries would all be admitted before
the first one failed.

A counter is dropped ``forget_after`` seconds after its last failure (sign-ins
that succeed do not keep it alive: a busy office behind one address must not
pile up a day's typos), and at most ``max_entries`` are kept (least recently
tried dropped first), so made-up names cannot fill the memory. The clock is
injectable for tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """``free`` failures cost nothing; then each try waits ``first`` s, doubling up to ``cap`` s."""

    free: int
    first: float
    cap: float

    def delay(self, failures: int) -> float:
        if failures < self.free:
            return 0.0
        return min(self.cap, self.first * 2 ** min(failures - self.free, 32))


# Someone mistyping their own password a few times never waits; a guesser gets
# about one try a minute per address (and one per 5 minutes per account there).
PER_ACCOUNT_AND_ADDRESS = Backoff(free=5, first=1.0, cap=300.0)
PER_ADDRESS = Backoff(free=20, first=1.0, cap=60.0)
FORGET_AFTER = 30 * 60.0  # longer than either cap: a patient guesser keeps failing, so is never forgotten
MAX_ENTRIES = 10_000  # a few MB at most


@dataclass
class _Counter:
    failures: int = 0  # tries whose password was wrong
    checking: int = 0  # tries admitted whose password is still being checked (count as failures)
    last_try: float = 0.0  # when the last try was admitted (refused ones do not count); waits start there
    last_failure: float = 0.0  # when the last try failed (or the counter was made); forgetting starts there


class SignInThrottle:
    """Decides whether a sign-in may be tried now; one per server, shared by its requests.

    ``admit`` before checking a password, then ``finished`` with the outcome.
    Not thread-safe: call it from the event loop (the password check itself may
    run in a thread).
    """

    def __init__(self, per_pair: Backoff = PER_ACCOUNT_AND_ADDRESS, per_address: Backoff = PER_ADDRESS,
                 forget_after: float = FORGET_AFTER, max_entries: int = MAX_ENTRIES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if forget_after < max(per_pair.cap, per_address.cap):
            raise ValueError("forget_after must be at least the longest wait")
        if max_entries < 2:
            raise ValueError("max_entries must be at least 2")
        self.per_pair = per_pair
        self.per_address = per_address
        self.forget_after = forget_after
        self.max_entries = max_entries
        self._clock = clock
        self._counters: dict[tuple[str, ...], _Counter] = {}  # insertion order = least recently tried first
        self._next_sweep = float("-inf")

    def admit(self, account: str, address: str) -> float:
        """0.0: go ahead (the try now counts as begun); otherwise the seconds left to wait."""
        now = self._clock()
        self._forget(now)
        keyed = self._keyed(account, address)
        wait = max(self._wait(self._counters.get(key), policy, now) for key, policy in keyed)
        if wait > 0:
            return wait
        for key, _ in keyed:
            counter = self._counters.pop(key, None) or _Counter(last_failure=now)
            counter.checking += 1
            counter.last_try = now
            self._counters[key] = counter  # re-inserted: newest last
        return 0.0

    def finished(self, account: str, address: str, succeeded: bool) -> float:
        """Record the outcome of an admitted try; the wait before the next try from there (0.0 if none)."""
        now = self._clock()
        keyed = self._keyed(account, address)
        for key, _ in keyed:
            counter = self._counters.get(key)
            if counter is None:  # forgotten meanwhile (only if the check took longer than forget_after)
                continue
            counter.checking = max(0, counter.checking - 1)
            if not succeeded:
                counter.failures += 1
                counter.last_failure = now
        if succeeded:
            # The right password clears that account's counter at that address, not the
            # address's: signing in to one's own account must not buy more guesses at others.
            pair = self._counters.get(keyed[0][0])
            if pair is not None:
                pair.failures = 0
            return 0.0
        return max(self._wait(self._counters.get(key), policy, now) for key, policy in keyed)

    def _keyed(self, account: str, address: str) -> list[tuple[tuple[str, ...], Backoff]]:
        return [(("pair", account, address), self.per_pair), (("address", address), self.per_address)]

    @staticmethod
    def _wait(counter: _Counter | None, policy: Backoff, now: float) -> float:
        if counter is None:
            return 0.0
        return max(0.0, counter.last_try + policy.delay(counter.failures + counter.checking) - now)

    def _forget(self, now: float) -> None:
        if now >= self._next_sweep:  # a sweep through all now and then, not on every try
            self._next_sweep = now + self.forget_after / 30
            for key in [k for k, c in self._counters.items()
                        if c.checking == 0 and now - c.last_failure >= self.forget_after]:
                del self._counters[key]
        while len(self._counters) > self.max_entries - 2:  # room for this try's two counters
            del self._counters[next(iter(self._counters))]
