"""One exception root for imageupdate, with typed subclasses.

Every error carries what it concerns (release, node, step) and a one-line
message that names the problem and, where there is one, the fix. Both front
doors (``imageupdate``, ``openstack imageupdate``) print ``error.message`` and
exit with ``error.exit_code``:

* 0 (``EXIT_OK``): success
* 1 (``EXIT_FAILED``): the operation failed (:class:`OperationError`)
* 2 (``EXIT_BAD_INPUT``): bad input; nothing was started or written (:class:`InputError`)
* 130 (``EXIT_INTERRUPTED``): interrupted by SIGINT or SIGTERM (:class:`Interrupted`), as a shell
  reports a command Ctrl-C stopped (128 + SIGINT); a CI job can tell a cancelled step from a failed one
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class ImageUpdateError(Exception):
    """Root of every error imageupdate raises on purpose."""

    exit_code: int = EXIT_FAILED

    def __init__(
        self,
        message: str,
        *,
        release: str | None = None,
        node: str | None = None,
        step: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.release = release
        self.node = node
        self.step = step

    def as_dict(self) -> dict[str, object]:
        """Machine-readable form, for ``--json`` output."""
        return {
            "error": type(self).__name__,
            "message": self.message,
            "exit_code": self.exit_code,
            "release": self.release,
            "node": self.node,
            "step": self.step,
        }


class InputError(ImageUpdateError):
    """The request cannot be carried out as given; nothing was changed."""

    exit_code = EXIT_BAD_INPUT


class OperationError(ImageUpdateError):
    """A valid request failed while it ran; what was published is untouched."""

    exit_code = EXIT_FAILED


class CloudAPIError(OperationError):
    """A cloud API (openstacksdk, keystoneauth) failed in a way no step turned into its own error."""


class InternalError(OperationError):
    """An exception imageupdate did not expect: a bug, said in one line (IMAGEUPDATE_DEBUG=1 re-raises it)."""


class Interrupted(ImageUpdateError):
    """SIGINT or SIGTERM stopped the command; each operation says what it left (nothing published, an
    operation left open for ``resume`` or ``cancel``)."""

    exit_code = EXIT_INTERRUPTED


# Bad input ---------------------------------------------------------------


class InvalidReleaseId(InputError):
    """A release id that is not safe as a path component."""


class ReleaseExists(InputError):
    """Building a release that is already in the store, without --force."""


class ReleaseNotFound(InputError):
    """A release that is not in the store."""


class UnknownElement(InputError):
    """An element name found on no elements path."""


class ElementsPathMissing(InputError):
    """An --elements-path directory that does not exist."""


class MissingHostDependency(InputError):
    """A program imageupdate needs is not installed on this host."""


class StoreNotWritable(InputError):
    """The image store directory cannot be created or written."""


class InvalidPostDeployTest(InputError):
    """A release ships a post-deploy test that cannot run (not executable, not a script or binary)."""


class InvalidUpgradeMetadata(InputError):
    """A release ships upgrade metadata (upgrade.json) that is invalid or does not match its migrations."""


# Operation failures -------------------------------------------------------


class BuildFailed(OperationError):
    """disk-image-create or the packaging of its output failed."""


class BuildInterrupted(Interrupted):
    """The build was interrupted (SIGINT/SIGTERM); nothing was published."""


class IntegrityError(OperationError):
    """An artifact does not match the checksum its manifest records."""


class StoreError(OperationError):
    """The image store is in a state imageupdate cannot work with."""


# Bad input: signatures and keys -------------------------------------------


class UntrustedRelease(InputError):
    """A release whose manifest is not signed, or not by a key the site or cloud fleet trusts, or whose
    signature does not match its manifest: refused before anything is unpacked, uploaded or rebuilt."""


class SigningKeyError(InputError):
    """The operator's signing key, or a key given to trust or revoke, is missing or not usable."""
