"""The few CUDA runtime calls that torch does not expose: raw device allocations and their IPC
handles, so that one process can map another process's GPU buffer (same host) and a kernel can
read it over NVLink. Called through ctypes on the libcudart that torch itself loaded."""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os

import torch


class IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_byte * 64)]


def _find_cudart() -> str:
    torch.cuda.init()
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.split()[-1]
            if "libcudart" in os.path.basename(path):
                return path
    # Not loaded as its own library (linked statically): the one of torch's CUDA wheels.
    site = os.path.dirname(os.path.dirname(torch.__file__))
    found = sorted(glob.glob(f"{site}/nvidia/cu*/lib/libcudart.so*"))
    if found:
        return found[-1]
    name = ctypes.util.find_library("cudart")
    if name is None:
        raise RuntimeError("libcudart not found")
    return name


class CudaRT:
    _lib = None

    def __init__(self):
        if CudaRT._lib is None:
            lib = ctypes.CDLL(_find_cudart())
            lib.cudaGetErrorString.restype = ctypes.c_char_p
            lib.cudaIpcOpenMemHandle.argtypes = [
                ctypes.POINTER(ctypes.c_void_p),
                IpcHandle,
                ctypes.c_uint,
            ]
            CudaRT._lib = lib
        self.lib = CudaRT._lib

    def _check(self, err: int, what: str) -> None:
        if err != 0:
            raise RuntimeError(f"{what} failed: {self.lib.cudaGetErrorString(err).decode()}")

    def set_device(self, index: int) -> None:
        self._check(self.lib.cudaSetDevice(ctypes.c_int(index)), "cudaSetDevice")

    def can_access_peer(self, device: int, peer: int) -> bool:
        ok = ctypes.c_int(0)
        self._check(
            self.lib.cudaDeviceCanAccessPeer(
                ctypes.byref(ok), ctypes.c_int(device), ctypes.c_int(peer)
            ),
            "cudaDeviceCanAccessPeer",
        )
        return bool(ok.value)

    def malloc_zeroed(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self._check(self.lib.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(nbytes)), "cudaMalloc")
        self._check(
            self.lib.cudaMemset(ptr, ctypes.c_int(0), ctypes.c_size_t(nbytes)), "cudaMemset"
        )
        self._check(self.lib.cudaDeviceSynchronize(), "cudaDeviceSynchronize")
        return ptr.value

    def free(self, ptr: int) -> None:
        self._check(self.lib.cudaFree(ctypes.c_void_p(ptr)), "cudaFree")

    def ipc_handle(self, ptr: int) -> bytes:
        h = IpcHandle()
        self._check(
            self.lib.cudaIpcGetMemHandle(ctypes.byref(h), ctypes.c_void_p(ptr)),
            "cudaIpcGetMemHandle",
        )
        return bytes(h.reserved)

    def ipc_open(self, handle: bytes) -> int:
        h = IpcHandle()
        ctypes.memmove(h.reserved, handle, 64)
        ptr = ctypes.c_void_p()
        # cudaIpcMemLazyEnablePeerAccess = 1: map it for this (the current) device
        self._check(
            self.lib.cudaIpcOpenMemHandle(ctypes.byref(ptr), h, ctypes.c_uint(1)),
            "cudaIpcOpenMemHandle",
        )
        return ptr.value

    def ipc_close(self, ptr: int) -> None:
        self._check(self.lib.cudaIpcCloseMemHandle(ctypes.c_void_p(ptr)), "cudaIpcCloseMemHandle")
