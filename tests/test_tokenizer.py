"""extract_windows: exact patches on the grid, the pixel-centre convention, zeros outside, gradients."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from spot.core.priors import grid_centers
from spot.core.tokenizer import extract_windows


def patchify(images: torch.Tensor, k: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, Gh*Gw, C, k, k) non-overlapping patches, row-major."""
    B, C, H, W = images.shape
    x = images[:, :, :H // k * k, :W // k * k].unfold(2, k, k).unfold(3, k, k)
    return x.permute(0, 2, 3, 1, 4, 5).reshape(B, -1, C, k, k)


def reference_windows(image: np.ndarray, positions: np.ndarray, k: int) -> np.ndarray:
    """Loop-by-loop bilinear reading in the pixel-centre convention, zeros outside: (N, C, k, k)."""
    C, H, W = image.shape

    def pixel(r, c):
        return image[:, r, c] if 0 <= r < H and 0 <= c < W else np.zeros(C)

    out = np.zeros((len(positions), C, k, k))
    for n, (y, x) in enumerate(positions):
        for i in range(k):
            for j in range(k):
                v = y * H + i - (k - 1) / 2 - 0.5        # continuous index: pixel r's centre is r + 0.5
                u = x * W + j - (k - 1) / 2 - 0.5
                r, c = math.floor(v), math.floor(u)
                a, b = v - r, u - c
                out[n, :, i, j] = ((1 - a) * (1 - b) * pixel(r, c) + (1 - a) * b * pixel(r, c + 1)
                                   + a * (1 - b) * pixel(r + 1, c) + a * b * pixel(r + 1, c + 1))
    return out


def photo(imagenet_sample, size: int) -> torch.Tensor:
    path = sorted(imagenet_sample.glob("*.JPEG"))[0]
    img = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float()[None] / 255


@pytest.mark.parametrize("size,k", [((224, 224), 16), ((28, 28), 4), ((32, 48), 8), ((30, 30), 4)])
def test_grid_centres_read_the_patches_exactly(size, k):
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    positions = grid_centers(*size, k).expand(2, -1, -1)
    assert torch.equal(extract_windows(images, positions, k), patchify(images, k))


def test_grid_centres_on_a_real_photograph(imagenet_sample):
    image = photo(imagenet_sample, 224)
    assert torch.equal(extract_windows(image, grid_centers(224, 224, 16)[None], 16), patchify(image, 16))


def test_matches_a_loop_reference_at_random_positions():
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(1, 2, 9, 13, generator=gen, dtype=torch.float64)
    positions = torch.rand(1, 12, 2, generator=gen, dtype=torch.float64) * 1.4 - 0.2   # some off the image
    got = extract_windows(image, positions, 5)[0].numpy()
    np.testing.assert_allclose(got, reference_windows(image[0].numpy(), positions[0].numpy(), 5), atol=1e-12)


def test_matches_grid_sample_in_float32():
    """An independent formulation: one F.grid_sample over all window samples (align_corners=False)."""
    gen = torch.Generator().manual_seed(2)
    images = torch.rand(3, 3, 40, 40, generator=gen)
    positions = torch.rand(3, 20, 2, generator=gen)
    k, (H, W) = 8, images.shape[-2:]
    d = torch.arange(k) - (k - 1) / 2
    offsets = torch.stack(torch.meshgrid(d / H, d / W, indexing="ij"), -1).reshape(-1, 2)
    grid = (2 * (positions[:, :, None] + offsets) - 1).flip(-1)
    ref = F.grid_sample(images, grid, align_corners=False).permute(0, 2, 1, 3).reshape(3, 20, 3, k, k)
    torch.testing.assert_close(extract_windows(images, positions, k), ref, atol=1e-5, rtol=0)


def test_half_pixel_shift_averages_neighbours():
    image = torch.arange(64.).reshape(1, 1, 8, 8)
    pos = torch.tensor([[[4 / 8, 4.5 / 8]]])              # x samples fall halfway between pixel centres
    window = extract_windows(image, pos, 2)[0, 0, 0]
    expected = (image[0, 0, 3:5, 3:5] + image[0, 0, 3:5, 4:6]) / 2
    torch.testing.assert_close(window, expected)


def test_off_image_reads_zero():
    images = torch.rand(2, 3, 16, 16) + 1                  # strictly positive pixels
    far = torch.tensor([[[-0.7, 0.5], [1.7, 0.5], [0.5, -0.7], [0.5, 1.7], [-3., 5.]]]).expand(2, -1, -1)
    assert torch.equal(extract_windows(images, far, 4), torch.zeros(2, 5, 3, 4, 4))
    corner = extract_windows(images, torch.zeros(2, 1, 2), 4)[:, 0]   # window centre on the top-left corner
    assert torch.equal(corner[..., :2, :], torch.zeros(2, 3, 2, 4))    # rows at -1.5, -0.5 px centres
    assert torch.equal(corner[..., 2:, 2:], images[:, :, :2, :2])      # rows/cols at pixel centres 0, 1


def test_gradcheck_positions_and_images():
    gen = torch.Generator().manual_seed(3)
    images = torch.rand(2, 2, 10, 12, generator=gen, dtype=torch.float64)
    # pixel coordinates y*H - k/2 with fractional part in [0.2, 0.8]: away from pixel boundaries
    pix = torch.randint(1, 7, (2, 4, 2), generator=gen) + 0.2 + 0.6 * torch.rand(2, 4, 2, generator=gen)
    positions = ((pix + 1.5) / torch.tensor([10., 12.])).double()
    positions.requires_grad_(True)
    images.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p, x: extract_windows(x, p, 3), (positions, images))


def test_gradient_points_to_the_bright_side():
    image = torch.zeros(1, 1, 16, 16)
    image[..., :, 10:] = 1.0                                # bright right half
    pos = torch.tensor([[[0.5, 0.5 + 0.1 / 16]]], requires_grad=True)
    extract_windows(image, pos, 4).sum().backward()
    assert pos.grad[0, 0, 1] > 0 and pos.grad[0, 0, 0] == 0


def test_dtypes_and_bad_input():
    images = torch.rand(1, 3, 16, 16)
    assert extract_windows(images.half(), torch.rand(1, 3, 2), 4).dtype == torch.float16
    with pytest.raises(ValueError, match="positions"):
        extract_windows(images, torch.rand(1, 3), 4)
    with pytest.raises(ValueError, match="k must be"):
        extract_windows(images, torch.rand(1, 3, 2), 0)
