"""The continual-learning toolkit, by concern; it imports nothing from norga's layers.

- `norga.cl.tasks`: class orders, task splits, the class -> task table, logit masks.
- `norga.cl.metrics`: FA, CA, FM on the accuracy matrix `acc[t][j]` (accuracy in percent on task j after
  training task t).
- `norga.cl.statistics`: Gaussian class statistics, classifier alignment on sampled features (TAP), the authors'
  feature regulariser.
- `norga.cl.identity`: task-identity inference (TII) whose prediction for a sample never depends on its batch.

The pieces follow the pipeline of HiDe-Prompt, which the NoRGa authors ran. Pure torch, device-agnostic.
"""

from .identity import NearestClassMean, task_id_accuracy
from .metrics import AccuracyMatrix, cumulative_average, final_average, forgetting
from .statistics import ClassStatistics, align_classifier, contrastive_regularization
from .tasks import class_order, mask_to_task, mask_unseen_logits, remap_labels, split_tasks, task_of_class

__all__ = [
    "AccuracyMatrix",
    "ClassStatistics",
    "NearestClassMean",
    "align_classifier",
    "class_order",
    "contrastive_regularization",
    "cumulative_average",
    "final_average",
    "forgetting",
    "mask_to_task",
    "mask_unseen_logits",
    "remap_labels",
    "split_tasks",
    "task_id_accuracy",
    "task_of_class",
]
