"""The paper's headline run, and the minutes the cost model gives it."""
import math

from kfac_mn.cost_model.stage_costs import MODES

IMAGENET_TRAIN_IMAGES = 1_281_167
#: the paper's headline run: 1,024 V100s, mini-batch 32,768, 45 epochs, 1,760
#: iterations, 74.9% top-1 in about 10 minutes
PAPER_RUN = {"workers": 1024, "global_batch": 32768, "epochs": 45, "iterations": 1760,
             "minutes": 10.0}


#: the key of the paper's own setting in :func:`paper_estimates`
HEADLINE = "45 epochs (paper: 1,760 iterations)"


def paper_estimates(row, batchsize):
    """Minutes of the paper's 1,024-worker runs at the modelled seconds per iteration."""
    global_batch = row["ranks"] * batchsize
    settings = {HEADLINE: PAPER_RUN["iterations"],
                "35 epochs": math.ceil(35 * IMAGENET_TRAIN_IMAGES / global_batch)}
    return {name: {"iterations": iterations,
                   **{mode: iterations * row[mode]["total"] / 60 for mode in MODES}}
            for name, iterations in settings.items()}
