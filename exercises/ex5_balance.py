"""Exercise 5 (about 15 minutes): the Switch load-balancing loss.

Routers often collapse: every input goes to one expert, and the other experts never train. The Switch
Transformer's auxiliary loss (Fedus et al. 2021, Eq. 4) pushes the load back towards even; MEPT keeps
it one flag away (--balance_coef). Grade it with
    python -m pytest exercises/test_ex5_balance.py
"""

import torch
import torch.nn.functional as F


def load_balancing_loss(routing, n_experts):
    """E * sum_e f_e * P_e for one block's routing of a batch.

    routing.expert_idx (B, K) long: the experts each input chose
    routing.probs      (B, E): the router's softmax over all experts
    n_experts E
    returns a scalar (a 0-dim float tensor):

        f_e  = (number of the B*K entries of expert_idx equal to e) / (B*K)    the load; no gradient
        P_e  = mean over the batch of probs[:, e]                             carries the gradient
        loss = E * sum_e f_e * P_e

    It is 1 for an even load (every f_e = P_e = 1/E) and grows towards E as one expert takes everything.
    The choices themselves cannot be differentiated; P_e can, so the gradient lowers the probability of
    the experts that are chosen most.

    Hints:
    - F.one_hot(x, num_classes) or torch.bincount(x, minlength=...) counts choices. Give the number of
      experts: an expert nobody chose must still get its (zero) entry.
    - Count every one of the B*K choices, not only each input's first.
    """
    raise NotImplementedError("exercise 5: write load_balancing_loss() in exercises/ex5_balance.py")
