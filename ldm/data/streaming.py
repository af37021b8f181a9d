"""Streaming image-caption data (``data.streaming: true``): datasets' streaming mode, Hub or webdataset shards.

For data that does not fit in memory or on disk. Nothing is validated ahead: an undecodable
example is skipped when it is met (and named in a warning). The order is still reproducible and
resumable: each epoch is the stream shuffled with a buffer seeded by ``(seed, epoch)``, split
across processes and DataLoader workers, and a resumed run skips exactly the examples it had
consumed. Every example carries its own seed, as in the map-style path.
"""

from __future__ import annotations

import logging

from datasets.distributed import split_dataset_by_node
from torch.utils.data import IterableDataset, get_worker_info

from ldm.config import DataConfig
from ldm.data.images import (DECODE_ERRORS, caption_of, check_captions, decode_image, flip_decision, image_name,
                             load_records, make_example)
from ldm.data.sampler import example_seed

logger = logging.getLogger(__name__)


class StreamingImageCaptions(IterableDataset):
    """Yields ``ImageCaptionDataset``-style items forever; use with ``DataLoader(batch_size=B)``.

    start_batches: batches this process consumed before (resume). With W workers the DataLoader
    takes batches from workers in turn, so worker w had produced ceil((start - w) / W) of them.
    """

    def __init__(self, data: DataConfig, seed: int, rank: int = 0, world_size: int = 1, batch_size: int = 1,
                 start_batches: int = 0, need_captions: bool = True, shuffle_buffer: int = 1000):
        self.data, self.seed, self.rank, self.world_size = data, seed, rank, world_size
        self.batch_size, self.start_batches, self.need_captions = batch_size, start_batches, need_captions
        self.shuffle_buffer = shuffle_buffer
        records = load_records(data, streaming=True)
        if need_captions:
            check_captions(records, data)

    def _stream(self, worker: int, workers: int):
        records = load_records(self.data, streaming=True)
        if self.data.max_samples is not None:  # the first N examples, as in the map-style dataset
            records = records.take(self.data.max_samples)
        records = records.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        return split_dataset_by_node(records, self.rank * workers + worker, self.world_size * workers)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        skip = max(0, -(-(self.start_batches - worker) // workers)) * self.batch_size
        stream, position, epoch = self._stream(worker, workers), 0, 0
        while True:
            stream.set_epoch(epoch)
            for row in stream:
                item = self._example(row, position, epoch, self.rank * workers + worker, self.world_size * workers)
                if item is None:
                    continue
                position += 1
                if position > skip:
                    yield item
            epoch += 1

    def _example(self, row: dict, position: int, epoch: int, shard: int, shards: int) -> dict | None:
        value = row[self.data.image_column]
        try:
            image = decode_image(value)
        except DECODE_ERRORS:
            logger.warning("skipped corrupt or unreadable image %s", image_name(value, position))
            return None
        seed = example_seed(self.seed, epoch, position * shards + shard)  # unique across processes and workers
        caption = caption_of(row, self.data, lambda: image_name(value, position)) if self.need_captions else ""
        size = (self.data.resolution, self.data.resolution)
        return make_example(image, caption, position, seed, size, self.data.crop,
                            self.data.random_flip and flip_decision(seed))
