"""Ignite handlers: evaluation report, Grad-CAM report, MLflow registry, reproducibility."""

from cutremain_monai.handlers.classification_report import ClassificationReport
from cutremain_monai.handlers.dicom_results import DicomResults
from cutremain_monai.handlers.gradcam_report import GradCAMReport
from cutremain_monai.handlers.lesion_masks import LesionMaskWriter
from cutremain_monai.handlers.localization_report import LocalizationReport
from cutremain_monai.handlers.mean_auc import MeanAUC, MeanAUCMetric
from cutremain_monai.handlers.mlflow_registry import MLflowRegistry, default_tracking_uri
from cutremain_monai.handlers.precise_bn import PreciseBatchNorm, recompute_batchnorm_statistics
from cutremain_monai.handlers.predictions import ClassificationPredictions, SeverityPredictions
from cutremain_monai.handlers.pseudo_labels import RefreshPseudoLabels
from cutremain_monai.handlers.reproducibility import BestModelState, EpochSeed, ResumeCheckpointLoader, StopAfterEpochs, last_checkpoints, latest_checkpoint
from cutremain_monai.handlers.severity_report import SeverityReport
from cutremain_monai.handlers.targetness_report import PatchTypeHistogram, TargetnessWriter, comparison_table

__all__ = ["DicomResults", "LocalizationReport", "ClassificationPredictions", "SeverityPredictions", "ClassificationReport", "GradCAMReport", "MeanAUC", "MeanAUCMetric", "MLflowRegistry", "SeverityReport", "default_tracking_uri", "BestModelState", "EpochSeed", "ResumeCheckpointLoader",
           "StopAfterEpochs", "last_checkpoints", "latest_checkpoint", "PatchTypeHistogram", "TargetnessWriter", "comparison_table",
           "RefreshPseudoLabels", "LesionMaskWriter", "PreciseBatchNorm", "recompute_batchnorm_statistics"]
