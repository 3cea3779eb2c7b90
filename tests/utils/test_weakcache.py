"""utils.weakcache: results cached per live object, never keeping the object alive."""

import gc
import weakref

from loraforge.decoding import stop_ids
from loraforge.models import load_tokenizer
from loraforge.training.data import _longest_token
from loraforge.utils.weakcache import per_object


def test_a_tokenizer_is_not_kept_alive_by_the_results_cached_for_it():
    """soak (a notebook in one process): stop_ids' functools.cache kept every tokenizer given to generate or
    accuracy (100 calls, each with the tokenizer loaded again, grew the process from 420 MB to 1.2 GB), and
    data._longest_token's lru_cache(maxsize=8) the tokenizers of the last 8 train() runs (+130 MB)."""
    tokenizer = load_tokenizer("smollm2-135m")
    assert stop_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")] == [2]  # its eos is <|im_end|>
    assert _longest_token(tokenizer) == max(len(token) for token in tokenizer.get_vocab())
    alive = weakref.ref(tokenizer)
    del tokenizer
    gc.collect()
    assert alive() is None


class Key:
    """An object compared by identity, as tokenizers are."""


def test_per_object_computes_once_per_live_object_and_each_call_for_one_without_weak_references():
    calls = []

    @per_object
    def size(obj):
        calls.append(obj)
        return len(calls)

    a, b = Key(), Key()
    assert [size(a), size(a), size(b), size(a)] == [1, 1, 2, 1]
    assert [size(7), size(7)] == [3, 4]  # an int takes no weak reference: computed each time, never an error
    size.cache_clear()
    assert size(a) == 5
