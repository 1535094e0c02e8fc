"""Gathered execution of a spatial block reads locations in the map's own layout (tokenprune/nn/asymmetric.py)."""

import pytest
import torch

from tokenprune.nn.asymmetric import AsymmetricPath, gather_locations

# (shape, channel dim, spatial dims, how the map is laid out in memory)
LAYOUTS = [
    ((2, 8, 5, 6), 1, (2, 3), "contiguous"),  # ConvNeXt [B, C, H, W]
    ((2, 8, 5, 6), 1, (2, 3), "channels_last"),  # [B, C, H, W] shape, channels-last memory (a permuted view)
    ((2, 5, 6, 8), 3, (1, 2), "contiguous"),  # Swin, ConvNeXt's MLP part [B, H, W, C]
    ((2, 30, 8), 2, (1,), "contiguous"),  # [B, H*W, C]
    ((2, 5, 6, 8), 3, (1, 2), "sliced"),  # a non-contiguous map: every other row of a wider one
]


def _map(shape, layout):
    if layout == "channels_last":
        return torch.randn(shape).to(memory_format=torch.channels_last)
    if layout == "sliced":
        return torch.randn(shape[0], shape[1] * 2, *shape[2:])[:, ::2]
    return torch.randn(shape)


def _reference_rows(x, channel):
    return x.movedim(channel, -1).flatten(1, -2)


@pytest.mark.parametrize("shape,channel,spatial,layout", LAYOUTS)
def test_gather_locations_takes_the_indexed_rows(shape, channel, spatial, layout):
    x = _map(shape, layout)
    rows = _reference_rows(x, channel)
    keep = torch.stack([torch.randperm(rows.shape[1])[:7].sort().values for _ in range(shape[0])])
    thin = gather_locations(x, keep, channel, spatial)
    assert thin.shape == tuple(7 if d == spatial[0] else 1 if d in spatial else n for d, n in enumerate(shape))
    got = _reference_rows(thin, channel)
    assert torch.equal(got, rows.gather(1, keep.unsqueeze(-1).expand(-1, -1, rows.shape[-1])))
    # the rows per-location layers read are contiguous channels-last rows (LayerNorm/Linear need no further copy)
    assert got.is_contiguous()


@pytest.mark.parametrize("shape,channel,spatial,layout", LAYOUTS)
def test_gathered_path_equals_masked_path(shape, channel, spatial, layout):
    """The thin slow path scattered back with the fast path at the other locations == both paths mixed by a mask."""
    x = _map(shape, layout)
    path = AsymmetricPath(shape[channel], channel, spatial, init_scale=0.5).eval()
    slow = torch.nn.Sequential(torch.nn.LayerNorm(shape[channel]), torch.nn.Linear(shape[channel], shape[channel]))

    def slow_path(m):  # a per-location layer run channels-last, returned in the map's layout
        return slow(m.movedim(channel, -1)).movedim(-1, channel)

    locations = _reference_rows(x, channel).shape[1]
    order = torch.stack([torch.randperm(locations) for _ in range(shape[0])])
    keep, drop = order[:, :11].sort(1).values, order[:, 11:].sort(1).values
    mask = torch.zeros(shape[0], locations, 1).scatter(1, keep.unsqueeze(-1), 1.0)
    with torch.no_grad():
        gathered = path(x, slow_path(gather_locations(x, keep, channel, spatial)), keep=keep, drop=drop)
        masked = path(x, slow_path(x), mask=mask)
    assert gathered.shape == x.shape
    torch.testing.assert_close(gathered, masked, rtol=1e-5, atol=1e-6)
