"""GFNet training: the paper's three stages (warm-up with random patches, PPO for the patch
policy, fine-tune with the policy's patches; Wang et al., NeurIPS 2020), or the one-stage recipe
(train.recipe=one-stage: all of them together, see one_stage.py). `train(config)` runs them;
`glancefocus train` is the command line."""
from .stages import ALL_STAGES, train

__all__ = ["ALL_STAGES", "train"]
