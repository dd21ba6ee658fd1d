"""One message the same on every rank from the messages some ranks have (collective)."""


def agreed_messages(comm, mine, by_rank=True):
    """Every rank's ``mine`` (a message, or None for none), combined on every rank: None when
    no rank has one; else the messages tagged ``rank r:`` (``by_rank``) or the distinct ones
    sorted, joined by "; "."""
    messages = comm.gather_obj(mine)
    combined = None
    if comm.rank == 0:
        if by_rank:
            combined = "; ".join(f"rank {rank}: {message}"
                                 for rank, message in enumerate(messages) if message)
        else:
            combined = "; ".join(sorted({m for m in messages if m}))
    return comm.bcast_obj(combined or None)
