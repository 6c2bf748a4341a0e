"""How close a reconstruction comes to the images it stands for: SSIM and PSNR from `torchmetrics`, per image, against
the baseline of the auxiliary data's mean image.

Images are scored in pixel space, [0, 1], after undoing the image processor's normalisation (`to_unit_range`). A row
the server saw may stand for several images (an ADC cluster): it is scored against every member, and reported as the
best member (what the server learns about someone) and the mean over members.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def to_unit_range(pixel_values: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised `pixel_values` (N, C, H, W) back to pixels in [0, 1] (`image_mean`, `image_std` of the processor)."""
    channels = pixel_values.shape[1]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean {list(mean)} and std {list(std)} must have one value per channel ({channels}).")
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (pixel_values.float().cpu() * std_t + mean_t).clamp(0, 1)


def image_scores(reconstructions: torch.Tensor, originals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (SSIM, PSNR in dB) of `reconstructions` against `originals`, both (N, C, H, W) in [0, 1]."""
    if reconstructions.shape != originals.shape or reconstructions.dim() != 4:
        raise ValueError(
            f"reconstructions {tuple(reconstructions.shape)} and originals {tuple(originals.shape)} must have one "
            "shape (N, C, H, W)."
        )
    kernel = min(11, *originals.shape[-2:])  # the usual 11, or the image's size
    kernel -= 1 - kernel % 2  # odd
    ssim = structural_similarity_index_measure(
        reconstructions.float(), originals.float(), data_range=1.0, reduction="none", kernel_size=kernel
    )
    psnr = peak_signal_noise_ratio(reconstructions.float(), originals.float(), data_range=1.0, reduction="none",
                                   dim=(1, 2, 3))  # fmt: skip
    return ssim, psnr


@dataclass
class ReconstructionReport:
    """Scores of one attack over many images. `*_images`: one value per image (its row's reconstruction against it);
    `*_best`: one value per row, its best member; `baseline_*`: the auxiliary mean image against each image."""

    ssim_images: torch.Tensor
    psnr_images: torch.Tensor
    ssim_best: torch.Tensor
    psnr_best: torch.Tensor
    baseline_ssim: torch.Tensor
    baseline_psnr: torch.Tensor

    def summary(self) -> dict[str, float]:
        def p90(values: torch.Tensor) -> float:
            return float(torch.quantile(values.double(), 0.9))

        return {
            "ssim_mean": float(self.ssim_images.mean()),
            "ssim_p90": p90(self.ssim_images),
            "psnr_mean": float(self.psnr_images.mean()),
            "psnr_p90": p90(self.psnr_images),
            "ssim_best_member_mean": float(self.ssim_best.mean()),
            "psnr_best_member_mean": float(self.psnr_best.mean()),
            "baseline_ssim_mean": float(self.baseline_ssim.mean()),
            "baseline_psnr_mean": float(self.baseline_psnr.mean()),
            "images": int(self.ssim_images.numel()),
            "rows": int(self.ssim_best.numel()),
        }


def score_rows(
    reconstructions: torch.Tensor, originals: torch.Tensor, members: torch.Tensor, mean_image: torch.Tensor
) -> ReconstructionReport:
    """Scores row reconstructions (T, C, H, W) against the images (B, C, H, W) whose row `members[i]` is; all in
    [0, 1]. `mean_image` (C, H, W) is the auxiliary data's mean image, the baseline."""
    if (
        members.shape != originals.shape[:1]
        or int(members.max()) >= reconstructions.shape[0]
        or int(members.min()) < 0
    ):
        raise ValueError(
            f"members {tuple(members.shape)} must give each of the {originals.shape[0]} images a row in "
            f"0 .. {reconstructions.shape[0] - 1}."
        )
    ssim, psnr = image_scores(reconstructions[members], originals)
    rows = reconstructions.shape[0]
    ssim_best = torch.full((rows,), -torch.inf).scatter_reduce(0, members, ssim, reduce="amax")
    psnr_best = torch.full((rows,), -torch.inf).scatter_reduce(0, members, psnr, reduce="amax")
    present = torch.bincount(members, minlength=rows) > 0
    baseline_ssim, baseline_psnr = image_scores(mean_image.expand_as(originals).contiguous(), originals)
    return ReconstructionReport(ssim, psnr, ssim_best[present], psnr_best[present], baseline_ssim, baseline_psnr)
