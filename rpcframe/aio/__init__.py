"""rpcframe's asyncio front: the same API as :mod:`rpcframe`, on grpc.aio.

::

    async with rpcframe.aio.connect("127.0.0.1:50051") as channel:
        stub = channel.stub(EchoServiceStub)
        response = await stub.Echo(EchoRequest(message="hi"))
"""

from ..client._aio import Call, Channel, connect
from ..server._aio import Server

__all__ = ["Call", "Channel", "Server", "connect"]
