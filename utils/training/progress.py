"""A one-line progress bar for rank 0: iteration, epoch, loss, lr, images/s and time left.

The line is redrawn in place (carriage return) at most every ``min_interval`` seconds;
:meth:`ProgressBar.message` prints a full line above it (epoch summaries, notices).  A
``quiet`` bar (the other ranks') prints nothing at all.
"""
import sys
import time


def format_duration(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressBar:
    def __init__(self, total_iterations, first_iteration=0, enabled=True, quiet=False,
                 stream=None, width=20, min_interval=0.5):
        """``first_iteration``: where this process started (a resumed run's checkpoint);
        ``enabled``: draw the bar; ``quiet``: print nothing, messages included."""
        self.total = total_iterations
        self.first = first_iteration
        self.enabled = enabled and not quiet
        self.quiet = quiet
        self.stream = sys.stdout if stream is None else stream
        self.width = width
        self.min_interval = min_interval
        self._last_draw = None
        self._line_open = False
        self._start = time.monotonic()

    def update(self, iteration, epoch, loss, lr, images_per_second):
        """Redraw the bar after ``iteration`` (of ``total``)."""
        if not self.enabled:
            return
        now = time.monotonic()
        final = iteration >= self.total
        if not final and self._last_draw is not None \
                and now - self._last_draw < self.min_interval:
            return
        self._last_draw = now
        fraction = min(iteration / self.total, 1.0)
        filled = int(fraction * self.width)
        done = iteration - self.first
        remaining = (now - self._start) / done * (self.total - iteration) if done > 0 else 0.0
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {fraction * 100:5.1f}% "
                f"iter {iteration}/{self.total} epoch {epoch:.2f} loss {loss:.4f} "
                f"lr {lr:.4g} {images_per_second:.0f} img/s ETA {format_duration(remaining)}")
        self.stream.write("\r" + line)
        self.stream.flush()
        self._line_open = True

    def message(self, text):
        """Print ``text`` on its own line (also with the bar disabled, unless quiet)."""
        if self.quiet:
            return
        if self._line_open:
            self.stream.write("\n")
            self._line_open = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self):
        if self._line_open:
            self.stream.write("\n")
            self.stream.flush()
            self._line_open = False
