"""Draw docs/img/partition.png: how Adam-mini partitions the parameters of one Llama layer.

Each panel is a weight matrix (rows = output features); colour = block. Run:
``python docs/figures.py``.
"""
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from adam_mini_tx import blocks  # noqa: E402

PANELS = [
    ("q_proj (4 heads)\none block per head", blocks.per_head((16, 12), 4)),
    ("k_proj (GQA: 2 KV heads)\none block per KV head", blocks.per_head((8, 12), 2)),
    ("v_proj / o_proj / MLP\none block per output neuron", blocks.per_row((8, 12))),
    ("embedding / lm_head\none block per token", blocks.per_row((10, 6))),
    ("GPT-2 c_attn (in, out), fused\n[q heads | k heads | v neurons]",
     blocks.fused_rows((6, 24), [("q", 2), ("k", 2), ("v", 8)], transposed=True)),
    ("norm weight\none block", blocks.single_block((12,))),
    ("bias\none block per element", blocks.elementwise((12,))),
]


def block_ids(layout: blocks.BlockLayout) -> torch.Tensor:
    """The block index of every element, via the layout's own broadcast."""
    ids = torch.arange(layout.num_blocks, dtype=torch.float32).reshape(layout.v_shape)
    return layout.expand(ids).expand(layout.shape).reshape(
        layout.shape if len(layout.shape) == 2 else (1, -1))


def main(path: pathlib.Path = pathlib.Path(__file__).parent / "img" / "partition.png") -> None:
    fig, axes = plt.subplots(1, len(PANELS), figsize=(17, 3.6))
    for ax, (title, layout) in zip(axes, PANELS):
        ids = block_ids(layout)
        ax.imshow(ids % 20, cmap="tab20", interpolation="nearest", aspect="auto")
        ax.set_title(title, fontsize=8.5)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Adam-mini: one second-moment value per colour (blocks follow the Hessian's "
                 "near-block-diagonal structure)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
