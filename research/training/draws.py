"""Every random draw of the training loop, recomputable from (seed, process, micro-step) alone.

Part of the loop floor; imports only torch. This is what keeps a resumed run bit-identical.
"""

from __future__ import annotations

import torch


def mix_seeds(*numbers: int) -> int:
    """A deterministic 63-bit seed from several integers (seed, step, micro-step)."""
    h = 1469598103934665603
    for n in numbers:
        h = ((h ^ (n & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


class Draws:
    """Every random draw of a micro-step, made on the training device.

    One generator per stream (DATA: flips, noise, timesteps; EXTRA: prior-preservation examples;
    DROPOUT: caption dropout), made once and re-seeded from (seed, process, micro-step, stream) at
    every micro-step. Any step can be redrawn from those numbers alone, which keeps a resumed run
    bit-identical; nothing is drawn on the host and copied over with a blocking `.to(device)`.
    Process 0 draws exactly what a single process draws; every other process draws its own flips,
    noise, timesteps and dropout for its own slice of the batch (with one shared seed, every process
    drew the same noise for different images).
    """

    DATA, EXTRA, DROPOUT = 7, 11, 13

    def __init__(self, seed: int, process_index: int, device: torch.device, noise_offset: float = 0.0):
        self.seed = seed if process_index == 0 else mix_seeds(seed, process_index)
        self.device, self.noise_offset = device, noise_offset
        self._generators: dict[int, torch.Generator] = {}

    def generator(self, stream: int, micro_step: int) -> torch.Generator:
        if stream not in self._generators:
            self._generators[stream] = torch.Generator(self.device)
        return self._generators[stream].manual_seed(mix_seeds(self.seed, micro_step, stream))

    def noise(self, shape, gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(shape, generator=gen, device=self.device)
        if self.noise_offset:
            noise += self.noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=gen, device=self.device)
        return noise

    def integers(self, high: int, n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randint(0, high, (n,), generator=gen, device=self.device)


def batch_indices(n: int, batch: int, micro_step: int, seed: int) -> list[int]:
    """Indices for one micro-batch: epochs are seeded permutations, so any step can be recomputed
    from (seed, step) alone, which is what makes a resumed run bit-identical."""
    out, pos = [], micro_step * batch
    while len(out) < batch:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seeds(seed, epoch)))
        take = min(batch - len(out), n - offset)
        out.extend(perm[offset:offset + take].tolist())
        pos += take
    return out
