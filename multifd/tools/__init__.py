"""Programs around the transport, not the transport itself.

The benchmark (multifd-bench) and rawcopy, the minimal TCP copier it measures multifd against;
the certificate generator (multifd-certs) and the test-image generator (multifd-mkimage); and
the loopback demo (python -m multifd.tools.demo). They use the transport and the shared
command-line grammar (multifd.args, multifd.units); the transport never imports this package.
"""
