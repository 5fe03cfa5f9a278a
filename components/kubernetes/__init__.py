"""Kubernetes delivery: the rendered files carried to every node by a DaemonSet.

The steps follow the same pipeline as SSH delivery. ``settings`` and
``values`` validate the ``nexus-mirror:kubernetes`` block. ``bundle`` turns the
rendered files into ConfigMap and Secret data. ``manifests`` and
``verify_pods`` build the Kubernetes objects as plain dicts, and ``render``
lists them all. ``verification`` reads the verification pods back, and
``component`` declares the objects with pulumi-kubernetes. Only ``component``
imports Pulumi.
"""
