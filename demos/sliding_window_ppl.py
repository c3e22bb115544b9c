"""PPL of a long licence text for several (max_length, stride) pairs.

    python demos/sliding_window_ppl.py [FILE]

Shows what Hugging Face's "perplexity of fixed-length models" guide
describes: with stride == max_length (independent chunks) many tokens are
predicted from little context, so PPL is higher; overlapping windows (a
smaller stride) give each token more left context and the PPL drops, at the
cost of more compute. The text is the GPL-3, which Debian ships.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from livepp import load_model
from livepp.scoring.teacher_forced import score_ids, text_ids

PAIRS = [(64, 64), (64, 16), (128, 128), (128, 32), (256, 256), (256, 64), (512, 512), (512, 128)]


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "/usr/share/common-licenses/GPL-3")
    loaded = load_model()
    ids, first, rule = text_ids(loaded, path.read_text(encoding="utf-8"))
    print(f"{path}: {len(ids)} tokens on {loaded.name}; {rule}\n")
    print(f"{'max_length':>10} {'stride':>6} {'windows':>7} {'PPL':>9} {'bits/token':>10} {'seconds':>8}")
    for max_length, stride in PAIRS:
        t = time.perf_counter()
        r = score_ids(loaded, ids, score_from=first, max_length=max_length, stride=stride, batch_size=4)
        print(f"{max_length:>10} {stride:>6} {r.windows:>7} {r.ppl:>9.4f} {r.bits_per_token:>10.4f} {time.perf_counter() - t:>8.1f}")


if __name__ == "__main__":
    main()
