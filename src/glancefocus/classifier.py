"""Classifier heads that turn the pooled features of steps 1..t into the prediction of step t."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class RecurrentClassifier(nn.Module):
    """GRU(feature_dim -> hidden) across steps, then Linear(hidden -> classes) at every step.

    The state is the GRU's hidden state [1, B, hidden]; None at the glance means zeros.
    """

    def __init__(self, feature_dim: int, hidden: int, num_classes: int):
        super().__init__()
        self.rnn = nn.GRU(feature_dim, hidden)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, feature: torch.Tensor, state: Optional[torch.Tensor], step: int):
        output, state = self.rnn(feature.unsqueeze(0), state)
        return self.fc(output[0]), state


class CascadedClassifier(nn.Module):
    """Step t >= 2: Linear(t * feature_dim -> classes) on the features of steps 1..t.

    Step 1 has no linear of its own: the model uses the glance encoder's head there. The state is
    the concatenation of the features so far [B, t * feature_dim].
    """

    def __init__(self, feature_dim: int, num_classes: int, max_steps: int):
        super().__init__()
        self.feature_dim = feature_dim
        self.max_steps = max_steps
        for step in range(2, max_steps + 1):
            # named fc_2 .. fc_T as in the authors' checkpoints
            self.add_module(f"fc_{step}", nn.Linear(step * feature_dim, num_classes))

    def forward(self, feature: torch.Tensor, state: Optional[torch.Tensor], step: int):
        state = feature if state is None else torch.cat([state, feature], dim=1)
        if step == 1:
            return None, state
        return getattr(self, f"fc_{step}")(state), state
