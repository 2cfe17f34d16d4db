"""The paper's published numbers (arXiv 2403.10568 v1, mope-reference §6.6), kept apart from ours.

Every value is a string exactly as printed in the paper (mean ±std over the paper's seeds, "–" where the paper has
none). The paper's backbones: Swin-B (ImageNet-22k) as the vision encoder and BERT-base as the text encoder unless a
row says ViT-B; datasets SNLI-VE (accuracy, 3 classes), UPMC Food-101 (accuracy) and MM-IMDB (F1-macro / F1-micro).
"""

from __future__ import annotations

SOURCE = "paper (arXiv 2403.10568 v1), Swin-B 22k + BERT-base unless the row says ViT-B"
COLUMNS = ("SNLI-VE acc", "Food-101 acc", "MM-IMDB F1-macro / F1-micro")

# Table 1: method -> (Param, SNLI-VE, Food-101, MM-IMDB)
TABLE1: dict[str, tuple[str, str, str, str]] = {
    "ImgOnly (FT)": ("86.9M", "33.34±.03", "75.64±.21", "39.21±.32 / 53.85±.21"),
    "TextOnly (FT)": ("109.0M", "69.58±.24", "86.92±.21", "58.80±.31 / 65.37±.13"),
    "LateConcat (FT)": ("196.0M", "72.01±.23", "93.19±.21", "60.43±.68 / 67.77±.36"),
    "SequentialFuse (FT)": ("197.0M", "74.28±.46", "93.73±.16", "59.22±.38 / 66.34±.19"),
    "MMBT": ("196.5M", "67.58", "94.10", "60.80 / 66.10"),
    "P-ImgOnly": ("0.1M", "33.34±.01", "76.65±.07", "33.70±.55 / 50.04±.27"),
    "P-TextOnly": ("0.1M", "64.86±.32", "81.01±.50", "52.19±.32 / 61.16±.43"),
    "P-LateConcat": ("1.3M", "64.29±.28", "90.27±.40", "56.95±.37 / 64.23±.26"),
    "P-SequentialFuse": ("1.1M", "65.01±.18", "81.27±.22", "55.57±.63 / 63.98±.35"),
    "P-MMBT": ("0.9M", "67.58", "81.07", "52.95 / 59.30"),
    "PromptFuse": ("<0.1M", "64.53", "82.21", "48.59 / 54.49"),
    "BlindPrompt": ("<0.1M", "65.54", "84.56", "50.18 / 56.46"),
    "PromptFuse(†, prefix)": ("0.1M", "64.94", "82.14", "50.78 / 60.96"),
    "PMF": ("2.5M", "71.92", "91.51", "58.77 / 64.51"),
    "Ours (ViT-B, k=4)": ("1.6M", "73.47±.11", "91.55±.12", "62.37±.35 / 68.73±.24"),
    "Ours (Swin-B, k=4)": ("1.6M", "73.14±.21", "91.54±.21", "61.93±.37 / 68.19±.14"),
    "Ours (Swin-B, k=16)": ("2.6M", "73.59±.15", "92.05±.11", "62.01±.21 / 68.24±.12"),
}

# method name (harness `method=`) -> Table 1 row
METHOD_ROWS = {
    "img_only": "ImgOnly (FT)",
    "text_only": "TextOnly (FT)",
    "late_concat": "LateConcat (FT)",
    "sequential_fuse": "SequentialFuse (FT)",
    "p_img_only": "P-ImgOnly",
    "p_text_only": "P-TextOnly",
    "p_late_concat": "P-LateConcat",
    "p_sequential_fuse": "P-SequentialFuse",
    "promptfuse": "PromptFuse",
}

# Table 2 (prompt ablation, Swin-B k=16): prompt set -> (SNLI-VE, Food-101, MM-IMDB)
TABLE2: dict[str, tuple[str, str, str]] = {
    "[P_s]": ("33.34±.01", "76.65±.07", "33.70±.55 / 50.04±.27"),
    "[P_d]": ("64.26±.41", "74.79±.38", "46.54±.77 / 59.71±.35"),
    "[P_m]": ("33.47±.32", "73.06±.12", "24.84±.14 / 45.10±.32"),
    "[P_s, P_d]": ("66.76±.26", "75.13±.14", "49.09±.43 / 60.89±.37"),
    "[P_s, P_m]": ("65.01±.18", "81.27±.22", "55.57±.63 / 63.98±.35"),
    "[P_d, P_m]": ("71.39±.59", "91.21±.16", "60.15±.37 / 67.14±.17"),
    "[P_s, P_d, P_m]": ("73.59±.15", "92.05±.11", "62.01±.21 / 68.24±.12"),
}

# Table 3 (routing) and Table 4 (routing embedding); the paper prints no std here
TABLE3: dict[str, tuple[str, str, str]] = {
    "Dense": ("73.55", "91.74", "62.01 / 68.25"),
    "Sparse (top-1)": ("71.15", "90.89", "60.28 / 66.01"),
}
ROUTING_ROWS = {"dense": "Dense", "top1_scaled": "Sparse (top-1)", "top1_hard": "Sparse (top-1)"}
TABLE4: dict[str, tuple[str, str, str]] = {
    "Frozen (orthogonal)": ("73.55", "91.74", "62.01 / 68.25"),
    "Learned": ("73.13", "91.20", "61.64 / 67.97"),
}
KEY_ROWS = {"frozen_orthogonal": "Frozen (orthogonal)", "learned": "Learned"}


def table1_row(method: str, num_experts: int | None, vision: str | None) -> str | None:
    """The Table-1 row that a run of `method` corresponds to (None: the paper has no such row)."""
    if method == "mope":
        if num_experts == 16:
            return "Ours (Swin-B, k=16)"
        if num_experts == 4:
            return (
                "Ours (ViT-B, k=4)"
                if vision and "vit" in vision.lower() and "swin" not in vision.lower()
                else "Ours (Swin-B, k=4)"
            )
        return None
    return METHOD_ROWS.get(method)


__all__ = [
    "COLUMNS",
    "KEY_ROWS",
    "METHOD_ROWS",
    "ROUTING_ROWS",
    "SOURCE",
    "TABLE1",
    "TABLE2",
    "TABLE3",
    "TABLE4",
    "table1_row",
]


# Table 7 (referring image segmentation, mIoU; Swin-B-384 + SETR-PUP head, BERT-base; mope-reference §6.6): method ->
# (Param incl. the head, RefCOCO val / testA / testB, RefCOCO+ val / testA / testB). No std printed.
TABLE7_SOURCE = "paper (arXiv 2403.10568) Table 7, Swin-B-384 + SETR-PUP, RefCOCO / RefCOCO+ mIoU"
TABLE7: dict[str, tuple[str, str, str, str, str, str, str]] = {
    "SequentialFuse": ("231.0M", "53.48", "55.76", "52.03", "40.22", "42.2", "37.91"),
    "P-SequentialFuse": ("35.1M", "47.69", "46.23", "45.81", "30.66", "31.48", "28.79"),
    "Ours (MoPE)": ("35.5M", "58.40", "60.03", "53.23", "43.80", "46.12", "38.88"),
}
TABLE7_ROWS = {"sequential_fuse": "SequentialFuse", "p_sequential_fuse": "P-SequentialFuse", "mope": "Ours (MoPE)"}
RIS_SPLITS = ("val", "testA", "testB")
