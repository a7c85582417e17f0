# hypeman-devices: build and install.
#
#   make                      # release build
#   sudo make install         # into /usr (PREFIX) under DESTDIR
#   sudo make uninstall
#
# BUILD_DIR is where the binaries are taken from (default target/release).

PREFIX     ?= /usr
DESTDIR    ?=
BINDIR     ?= $(PREFIX)/bin
LIBEXECDIR ?= $(PREFIX)/libexec
DATADIR    ?= $(PREFIX)/share
MANDIR     ?= $(DATADIR)/man
UNITDIR    ?= $(PREFIX)/lib/systemd/system
# The system bus and polkitd read their files from /usr/share only (not from
# /usr/local/share), so these do not follow PREFIX: with PREFIX=/usr/local the
# binaries go under /usr/local and these still where the daemons look.
DBUSCONFDIR    ?= /usr/share/dbus-1/system.d
DBUSSERVICEDIR ?= /usr/share/dbus-1/system-services
POLKITACTIONDIR ?= /usr/share/polkit-1/actions
POLKITRULEDIR   ?= /usr/share/polkit-1/rules.d
BASHCOMPDIR ?= $(DATADIR)/bash-completion/completions
ZSHCOMPDIR  ?= $(DATADIR)/zsh/vendor-completions
FISHCOMPDIR ?= $(DATADIR)/fish/vendor_completions.d

CARGO     ?= cargo
BUILD_DIR ?= target/release
# Shell completions and man pages, when the build generated them (hypemanctl).
GEN_DIR   ?= $(BUILD_DIR)/generated

INSTALLED = \
	$(LIBEXECDIR)/hypemand \
	$(BINDIR)/hypemanctl \
	$(LIBEXECDIR)/hypeman-device-plugin \
	$(UNITDIR)/hypeman-device-plugin.service \
	$(UNITDIR)/hypemand.service \
	$(UNITDIR)/hypemand-api.socket \
	$(DBUSCONFDIR)/org.hypeman.Devices.conf \
	$(DBUSSERVICEDIR)/org.hypeman.Devices.service \
	$(POLKITACTIONDIR)/org.hypeman.devices.policy \
	$(POLKITRULEDIR)/50-org.hypeman.devices.rules \
	$(BASHCOMPDIR)/hypemanctl \
	$(ZSHCOMPDIR)/_hypemanctl \
	$(FISHCOMPDIR)/hypemanctl.fish \
	$(MANDIR)/man1/hypemanctl.1 \
	$(MANDIR)/man1/hypemanctl-*.1 \
	$(MANDIR)/man8/hypemand.8

.PHONY: all build install uninstall

all: build

build:
	$(CARGO) build --release --locked --workspace --bins

install:
	@test -x $(BUILD_DIR)/hypemand || { echo "no $(BUILD_DIR)/hypemand: run 'make' first (or set BUILD_DIR)" >&2; exit 1; }
	$(BUILD_DIR)/hypemanctl generate-assets $(GEN_DIR)
	$(BUILD_DIR)/hypemand --write-man-page $(GEN_DIR)
	install -Dm755 $(BUILD_DIR)/hypemand $(DESTDIR)$(LIBEXECDIR)/hypemand
	install -Dm755 $(BUILD_DIR)/hypemanctl $(DESTDIR)$(BINDIR)/hypemanctl
	install -Dm755 $(BUILD_DIR)/hypeman-device-plugin $(DESTDIR)$(LIBEXECDIR)/hypeman-device-plugin
	install -d $(DESTDIR)$(UNITDIR) $(DESTDIR)$(DBUSSERVICEDIR)
	sed 's|/usr/libexec/hypemand|$(LIBEXECDIR)/hypemand|' systemd/hypemand.service > $(DESTDIR)$(UNITDIR)/hypemand.service
	sed 's|/usr/libexec/hypemand|$(LIBEXECDIR)/hypemand|' dbus/org.hypeman.Devices.service > $(DESTDIR)$(DBUSSERVICEDIR)/org.hypeman.Devices.service
	install -m644 systemd/hypemand-api.socket $(DESTDIR)$(UNITDIR)/hypemand-api.socket
	sed 's|/usr/libexec/hypeman-device-plugin|$(LIBEXECDIR)/hypeman-device-plugin|' systemd/hypeman-device-plugin.service > $(DESTDIR)$(UNITDIR)/hypeman-device-plugin.service
	chmod 644 $(DESTDIR)$(UNITDIR)/hypeman-device-plugin.service
	chmod 644 $(DESTDIR)$(UNITDIR)/hypemand.service $(DESTDIR)$(DBUSSERVICEDIR)/org.hypeman.Devices.service
	install -Dm644 dbus/org.hypeman.Devices.conf $(DESTDIR)$(DBUSCONFDIR)/org.hypeman.Devices.conf
	install -Dm644 polkit/org.hypeman.devices.policy $(DESTDIR)$(POLKITACTIONDIR)/org.hypeman.devices.policy
	install -Dm644 polkit/50-org.hypeman.devices.rules $(DESTDIR)$(POLKITRULEDIR)/50-org.hypeman.devices.rules
	if [ -f $(GEN_DIR)/hypemanctl.bash ]; then install -Dm644 $(GEN_DIR)/hypemanctl.bash $(DESTDIR)$(BASHCOMPDIR)/hypemanctl; fi
	if [ -f $(GEN_DIR)/_hypemanctl ]; then install -Dm644 $(GEN_DIR)/_hypemanctl $(DESTDIR)$(ZSHCOMPDIR)/_hypemanctl; fi
	if [ -f $(GEN_DIR)/hypemanctl.fish ]; then install -Dm644 $(GEN_DIR)/hypemanctl.fish $(DESTDIR)$(FISHCOMPDIR)/hypemanctl.fish; fi
	for page in $(GEN_DIR)/hypemanctl*.1; do if [ -f "$$page" ]; then install -Dm644 "$$page" $(DESTDIR)$(MANDIR)/man1/$$(basename "$$page"); fi; done
	if [ -f $(GEN_DIR)/hypemand.8 ]; then install -Dm644 $(GEN_DIR)/hypemand.8 $(DESTDIR)$(MANDIR)/man8/hypemand.8; fi

uninstall:
	rm -f $(addprefix $(DESTDIR),$(INSTALLED))
