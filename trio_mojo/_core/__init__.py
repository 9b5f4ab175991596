"""The sans-I/O core: the Mojo wire format, the decoder, the encoder, ``Message``.

Nothing here does I/O: no Trio, no sockets, no system calls beyond closing
the fds a :class:`~trio_mojo.Handle` owns.  Bytes and fds go in, messages and
``sendmsg`` plans come out; the Trio shell (``_channel``, ``_fdpass``) does
the rest.  Modules:

* ``_wire``: header layouts, ``MessageType``, ``Framing``, limits;
* ``_decoder``: ``MessageDecoder``, bytes and fds in, validated messages out;
* ``_encoder``: the outgoing queue and the ``sendmsg`` planner;
* ``_message``: the ``Message`` type.
"""
