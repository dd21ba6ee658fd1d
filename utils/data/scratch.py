"""Per-thread work arrays that the per-example transforms reuse from call to call."""
import threading


class ScratchArrays:
    """Named work arrays, one set per thread: an example's intermediate crop and planes are
    written into the previous example's arrays (OpenCV's ``dst`` arguments), which are
    still in cache, instead of freshly allocated ones. OpenCV allocates a new array when the
    old one does not fit; ``keep`` then stores that one. The arrays never leave the code that
    uses them. Pickles empty, so worker processes start with none."""

    def __init__(self):
        self._local = threading.local()

    def get(self, name):
        """The array kept under ``name`` by this thread, or None."""
        return getattr(self._local, name, None)

    def keep(self, name, array):
        """Keep ``array`` under ``name`` for this thread's next call; returns it."""
        setattr(self._local, name, array)
        return array

    def __reduce__(self):
        return ScratchArrays, ()
