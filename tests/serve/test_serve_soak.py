"""A short soak of the HTTP server (bench/soak.py's traffic for 20 s): concurrent openai clients, half streaming,
hot load/unload, disconnects mid-stream, bursts past the queue, bad input of many kinds. No 5xx, no stream that
ends with an error, every greedy 200 equal to the answer the server gave alone, every bad input a JSON 4xx.
"""

import sys
from pathlib import Path

import pytest
import torch

from loraforge.serve.api import ServerThread, create_app

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import soak  # noqa: E402

pytestmark = [pytest.mark.soak, pytest.mark.filterwarnings("error::FutureWarning"),
              pytest.mark.filterwarnings("error::DeprecationWarning")]


def test_soak_no_5xx_every_200_right(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = soak.make_engine(tmp_path, adapters=3, max_loaded=2, max_queue=16)
    try:
        with ServerThread(create_app(engine, api_key=soak.KEY)) as url:
            traffic = soak.Traffic(url, ["a0", "a1", "a2", "tiny"])
            traffic.learn()
            traffic.run(seconds=20, clients=12)
    finally:
        engine.stop()
        torch.set_num_threads(threads)
    counts = traffic.counts
    assert traffic.failures == [] and traffic.fives() == 0, traffic.failures[:5]
    kinds = {k for (k, status) in counts if status == 200}
    assert {"greedy", "greedy-stream", "sample", "disconnect", "load", "unload"} <= kinds, counts
    assert sum(n for (k, s), n in counts.items() if k == "bad" and 400 <= s < 500) >= 5, counts
