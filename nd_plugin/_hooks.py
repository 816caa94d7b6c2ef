"""The one owner of forward hooks: every hook nd-plugin registers goes through :class:`HookOwner`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["ForwardHooks", "HookOwner"]


class HookOwner:
    """Context manager that registers hooks on entry and removes all of them on exit.

    Subclasses implement :meth:`register` and call :meth:`keep` with each handle. If registering
    fails half-way, the hooks registered so far are removed before the error propagates; the forward
    passes run inside the ``with`` block, so hooks are removed when they raise too.
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def register(self) -> None:
        """Registers the hooks (calls :meth:`keep` for each)."""
        raise NotImplementedError

    def keep(self, handle: RemovableHandle) -> None:
        """Takes ownership of a hook handle."""
        self._handles.append(handle)

    def __enter__(self):
        try:
            self.register()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Removes every hook this owner registered."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class ForwardHooks(HookOwner):
    """One forward hook ``fn(module, inputs, output)`` on each of ``modules``, for the ``with`` block.

    Example:
        >>> seen = []
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> with ForwardHooks(net.modules(), lambda m, i, o: seen.append(type(m).__name__)):
        ...     _ = net(torch.randn(1, 2))
        >>> seen
        ['Linear', 'ReLU', 'Sequential']
    """

    def __init__(self, modules: Iterable[nn.Module], fn: Callable[[nn.Module, Any, Any], None]) -> None:
        super().__init__()
        self.modules = list(modules)
        self.fn = fn

    def register(self) -> None:
        for module in self.modules:
            self.keep(module.register_forward_hook(self.fn))
