"""The enclave init inside odyn: service units, dependency order, restarts and the control channel.

``manager`` runs the services (``graph`` orders them, ``service_logs`` keeps their output);
``controller`` is the contract between the control server and the manager; ``control_server``
serves the init control protocol on a Unix socket and on vsock; ``initctl`` is the client, used
by the ``initctl`` command, the host side and the Ansible modules.
"""
