"""Progress: a bar on a terminal, periodic log lines elsewhere."""


def test_progress_logs_off_a_terminal():
    from loguru import logger

    from guard.progress import Progress

    lines = []
    sink = logger.add(lines.append, level="INFO", format="{message}")
    logger.enable("guard")                           # the guard's log is off until asked for
    try:
        with Progress(5000, "scan/test", every=0.0) as p:
            assert p.bar is None                     # pytest's stderr is not a terminal
            for _ in range(5):
                p.update(1000)
        with Progress(100, "small") as p:            # short passes stay quiet
            p.update(100)
    finally:
        logger.disable("guard")
        logger.remove(sink)
    assert len(lines) == 5 and "5,000/5,000 samples (100%)" in lines[-1]
    assert not any("small" in m for m in lines)
