"""Turning a stream of generated text pieces into output that never shows a stop string.

Text that might be the beginning of a stop string is held back until the next piece proves it
is not (or the stream ends), so a streaming client never sees half a stop string.
"""


class StopStringFilter:
    def __init__(self, stops):
        self.stops = [s for s in (stops or ()) if s]
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Add generated text; return what is safe to show now. Sets `stopped` on a stop string."""
        if self.stopped:
            return ""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        keep = self._held_suffix()
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out

    def flush(self) -> str:
        """The generation ended: release whatever was held back."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out

    def _held_suffix(self) -> int:
        return partial_match_length(self.pending, self.stops)


def partial_match_length(text: str, patterns) -> int:
    """Length of the longest end of `text` that is the start (but not the whole) of some pattern."""
    longest = 0
    for pattern in patterns:
        for n in range(min(len(pattern) - 1, len(text)), longest, -1):
            if text.endswith(pattern[:n]):
                longest = n
                break
    return longest
