"""Shared check of an ONNX session's inputs and outputs against a published layout."""


def assert_io_as_published(sess, want_in, want_out) -> None:
    """``want_*``: ``(name, type, rank, {axis: fixed size})`` per tensor, in the published order."""
    for got, want in ((sess.get_inputs(), want_in), (sess.get_outputs(), want_out)):
        assert [a.name for a in got] == [w[0] for w in want]
        for a, (n, typ, rank, fixed) in zip(got, want):
            assert a.type == typ, n
            assert len(a.shape) == rank, (n, a.shape)
            for axis, size in fixed.items():
                assert a.shape[axis] == size, (n, a.shape)
