"""Service discovery: backends announce themselves, clients find them (etcd).

- :mod:`.etcd_registration`: :class:`~rpcframe.EtcdRegistration`, a server's
  key under a lease, kept alive and revoked on close;
- :mod:`.etcd_resolver`: :class:`~rpcframe.EtcdResolver`, the endpoints under
  a key prefix, watched (what an ``etcd://`` target resolves to);
- :mod:`.etcd_gateway`: the etcd v3 JSON gateway client and the registry's
  value format both use (standard library only).

Nothing here is imported by ``import rpcframe``: the modules load when one of
these names or an ``etcd://`` target is first used.
"""
