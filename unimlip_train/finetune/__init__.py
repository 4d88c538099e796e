"""Fine-tuning a pre-trained checkpoint for the paper's downstream tasks: classification on a fraction of the labels
(``classify``) and medical VQA (``vqa``), each scored on a test split and stamped with a provenance card."""
