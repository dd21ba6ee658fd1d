"""Rank 0's progress: a tqdm bar (iteration, epoch, loss, lr, images/s, time left) and whole
lines above it (epoch summaries, notices).

The bar is drawn only on a terminal (tqdm's ``disable=None``): redirected into a log file,
a run writes its messages and nothing else, instead of a carriage-return line that grows by
every redraw.  A ``quiet`` bar (the other ranks') prints nothing at all.
"""
import sys

from tqdm import tqdm


def format_duration(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressBar:
    def __init__(self, total_iterations, first_iteration=0, enabled=True, quiet=False,
                 stream=None, min_interval=0.5):
        """``first_iteration``: where this process started (a resumed run's checkpoint);
        ``enabled``: draw the bar (on a terminal); ``quiet``: print nothing, messages
        included."""
        self.quiet = quiet
        self.stream = sys.stdout if stream is None else stream
        self._bar = None
        if enabled and not quiet:
            self._bar = tqdm(total=total_iterations, initial=first_iteration, unit="it",
                             file=self.stream, mininterval=min_interval, dynamic_ncols=True,
                             disable=None, leave=False)

    def update(self, iteration, epoch, loss, lr, images_per_second):
        """Move the bar to ``iteration`` with the current figures."""
        if self._bar is None or self._bar.disable:
            return
        self._bar.set_postfix_str(f"epoch {epoch:.2f} loss {loss:.4f} lr {lr:.4g} "
                                  f"{images_per_second:.0f} img/s", refresh=False)
        self._bar.update(iteration - self._bar.n)

    def message(self, text):
        """Print ``text`` on its own line, above the bar (also without a bar, unless quiet)."""
        if self.quiet:
            return
        if self._bar is not None and not self._bar.disable:
            self._bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
